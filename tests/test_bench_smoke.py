"""Smoke test of benchmarks/bench_train_e2e.py: its data writer, and the whole benchmark path for one mmkit side
over 2 optimizer steps (inputs checked against TRL's collator, subprocess, step stamps, memory, JSON). No time
is asserted; the numbers it prints mean nothing at this size."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_writer_mix_images_and_records(bench, tmp_path):
    data = bench.write_dataset(tmp_path, 60, seed=3)
    records = json.loads(Path(data["json"]).read_text())
    assert len(records) == 60 == sum(data["mix"].values())
    assert set(data["mix"]) == {"vqa", "conversation", "description", "text"}
    assert data["mix"]["vqa"] > data["mix"]["text"]  # 40% vs 5%
    for rec in records:
        kind = rec["id"].split("-")[0]
        conv = rec["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        exchanges = len(conv) // 2
        assert {"vqa": 1 <= exchanges <= 4, "conversation": 3 <= exchanges <= 8, "description": exchanges == 1,
                "text": 1 <= exchanges <= 3}[kind], rec["id"]
        if kind == "text":
            assert "image" not in rec and all("<image>" not in m["value"] for m in conv)
            continue
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(m["value"].count("<image>") for m in conv) == 1
        with Image.open(Path(data["images"]) / rec["image"]) as img:
            assert img.format == "JPEG"
            assert 200 <= min(img.size) and max(img.size) <= 640
    # the same seed writes the same records
    again = bench.write_dataset(tmp_path / "again", 60, seed=3)
    assert json.loads(Path(again["json"]).read_text()) == records


def test_one_mmkit_side_two_steps_end_to_end(bench, tmp_path, capsys):
    pytest.importorskip("trl")  # the inputs are checked against TRL's collator before anything runs
    pytest.importorskip("datasets")
    pytest.importorskip("sentencepiece")
    out = tmp_path / "result.json"
    rc = bench.main(["--sides", "packed", "--steps", "2", "--warmup", "1", "--global-batch", "4", "--batch", "2",
                     "--rounds", "1", "--json", str(out), "--keep", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    check = result["inputs_check"]
    # mmkit's ids, labels and pixels equal what TRL's collator makes of the same records
    assert check["samples"] == 8 and check["same_ids"] == 8 and check["same_labels"] == 8
    assert check["pixel_max_abs_diff"] == 0
    (run,) = result["runs"]
    assert run["side"] == "packed" and run["rc"] == 0 and run["steps_done"] == 2
    assert len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"])
    assert run["samples_s"] > 0 and run["max_rss_one_process_mib"] > 0 and run["processes"] >= 2  # + a worker
    assert "packed" in result["sides"] and "(c) mmkit workers+packing" in printed


def test_bench_data_index_small(tmp_path):
    """benchmarks/bench_data_index.py end to end on 3,000 records: generation, conversion, the three children."""
    pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data_index.py"
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(script), "--records", "3000", "--cache", str(tmp_path / "c"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu ISA:" in proc.stdout and "private growth vs JSON" in proc.stdout
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"json", "arrow", "webdataset"}
    assert all(r["samples"] == 3000 and r["first_batch_s"] > 0 for r in res.values())
