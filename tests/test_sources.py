"""Arrow (Hugging Face ``datasets``) and WebDataset shard sources, the converter, and training on them: the same
samples as the LLaVA JSON they came from, bad rows counted, exact resume after a kill with workers."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmkit.data.collate import Collator
from mmkit.data.dataset import DataError, FailedSample, LlavaDataset, build_dataset, open_source, source_kind
from mmkit.data.loader import build_loader
from mmkit.data.sampler import StepBatchSampler
from mmkit.recipe import DataConfig, DataSource, RecipeError, load_recipe
from tests.test_data import GOOD, TOKENS_PER_IMAGE, processor, rec  # noqa: F401  (processor: a fixture)
from tests.test_train import run_train, weights

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

from mmkit.data.convert import main as convert_main  # noqa: E402  (needs the optional packages)
from mmkit.data.shards import INDEX_SUFFIX  # noqa: E402


def _llava_dataset(root: Path, n_good: int = 0) -> Path:
    """A LLaVA JSON dataset with PNG and JPEG images, a broken record, a missing and a corrupt image; ``n_good``
    more simple records (for training)."""
    (root / "img").mkdir(parents=True)
    for k, color in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (32 + 8 * k, 32), color).save(root / "img" / f"{k}.png")
    Image.new("RGB", (40, 30), "purple").save(root / "img" / "photo.jpg", quality=90)
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image" * 3)
    records = list(GOOD) + [
        rec("jpeg", "img/photo.jpg", ("<image>\nwhat color is the square ?", "purple")),
        rec("missing", "img/nope.png"),
        rec("corrupt", "img/corrupt.png"),
        {"id": "broken", "conversations": [{"from": "human", "value": "<image>\nhi"}], "image": "img/0.png"},
    ]
    colors = ["red", "blue", "green", "yellow"]
    records += [rec(f"t{k}", f"img/{k % 4}.png", ("<image>\nwhat color is the circle ?", colors[k % 4]))
                for k in range(n_good)]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The dataset converted both ways, shards small enough that there are several."""
    root = tmp_path_factory.mktemp("src")
    src = _llava_dataset(root)
    out = {}
    for to in ("webdataset", "arrow"):
        out[to] = root / to
        assert convert_main([str(src), "--image-folder", str(root), "--to", to, str(out[to]),
                             "--shard-size", "300B"]) == 0
    return root, src, out


def _same_sample(a, b):
    assert a["id"] == b["id"] and a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert a["image_sizes"] == b["image_sizes"] and len(a["pixel_values"]) == len(b["pixel_values"])
    assert all(torch.equal(x, y) for x, y in zip(a["pixel_values"], b["pixel_values"]))


def test_converted_sources_give_the_json_samples(converted, processor):  # noqa: F811
    root, src, out = converted
    ref = LlavaDataset(src, root, processor, "vicuna_v1")
    good = [i for i in range(len(ref)) if not isinstance(ref[i], FailedSample)]  # the corrupt image: at load time
    assert [ref.records[i][1] for i in good] == ["a", "b", "c", "d", "jpeg"]
    assert len(list(out["webdataset"].glob("*.tar"))) > 1 and len(list(out["arrow"].glob("*.arrow"))) > 1
    for to, kind in (("webdataset", "ShardDataset"), ("arrow", "ArrowDataset")):
        ds = open_source(str(out[to]), str(out[to]), processor, "vicuna_v1")
        assert type(ds).__name__ == kind and len(ds) == len(good)
        for k, i in enumerate(good):
            _same_sample(ds[k], ref[i])
        # group_by_modality_length's lengths, from the shard index / computed from the Arrow columns
        assert list(ds.lengths) == [ref.lengths[i] for i in good]
        assert list(ds.modality_lengths) == [ref.modality_lengths[i] for i in good]
    summary = json.loads((out["arrow"] / "conversion.json").read_text())
    assert summary["records_written"] == 5 and summary["records_skipped"] == 3
    assert summary["skipped"]["counts"] == {"missing_image": 1, "corrupt_image": 1, "roles": 1}
    assert json.loads((out["webdataset"] / "conversion.json").read_text())["skipped"] == summary["skipped"]


def test_parquet_and_shards_without_an_index(converted, processor, tmp_path):  # noqa: F811
    root, src, out = converted
    ref = open_source(str(out["arrow"]), str(out["arrow"]), processor, "vicuna_v1")
    datasets.load_from_disk(str(out["arrow"])).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    pq = open_source(str(tmp_path / "pq"), str(root), processor, "vicuna_v1")
    assert type(pq).__name__ == "ArrowDataset" and len(pq) == len(ref)
    for i in range(len(ref)):
        _same_sample(pq[i], ref[i])
    # shards written by another tool: no index file; it is built from the tar headers
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in out["webdataset"].glob("*.tar"):
        (bare / shard.name).write_bytes(shard.read_bytes())
    assert not list(bare.glob("*" + INDEX_SUFFIX))
    sh = open_source(str(bare), str(bare), processor, "vicuna_v1")
    assert len(sh) == len(ref) and list(sh.modality_lengths) == list(ref.modality_lengths)
    for i in range(len(ref)):
        _same_sample(sh[i], ref[i])
    pattern = str(bare / "shard-{000000..000001}.tar")
    assert source_kind(pattern) == "webdataset" and len(open_source(pattern, str(bare), processor)) < len(ref)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _png(color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_rows_are_dropped_when_loaded_with_training_reasons(processor, tmp_path, caplog):  # noqa: F811
    good = rec("ok", "x.png")
    rows = {"id": ["ok", "roles", "count", None],
            "image": [{"bytes": _png(), "path": "x.png"}, {"bytes": _png(), "path": "y.png"}, None,
                      {"bytes": b"not an image", "path": "z.png"}],
            "conversations": [good["conversations"], [{"from": "human", "value": "<image>\nhi"}],
                              good["conversations"], good["conversations"]]}
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"),
                                                  "value": datasets.Value("string")}]})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "ov"))
    ds = open_source(str(tmp_path / "ov"), None, processor, "vicuna_v1")
    with caplog.at_level(logging.WARNING, logger="mmkit.data"):
        got = [ds[i] for i in range(len(ds))]
    assert got[0]["id"] == "ok" and [g.reason for g in got[1:]] == ["roles", "image_count", "corrupt_image"]
    assert got[3].record_id == "row 3" and f"{tmp_path / 'ov'}[3]" in caplog.text
    batch = Collator(processor)(got)
    assert batch["num_samples"] == 1 and batch["skips"]["counts"] == {"roles": 1, "image_count": 1,
                                                                       "corrupt_image": 1}
    with pytest.raises(DataError, match="roles"):
        open_source(str(tmp_path / "ov"), None, processor, "vicuna_v1", strict=True)[1]

    (tmp_path / "sh").mkdir()
    shard = _tar(tmp_path / "sh" / "s.tar", {
        "k1.json": json.dumps(good).encode(), "k1.png": _png(),
        "k2.json": b"{not json", "k3.json": json.dumps(rec("two", ["p.png", "q.png"])).encode(),
        "k3.0.png": _png(), "k3.1.png": _png("blue"),
        "k4.json": json.dumps(rec("nofile", "absent.png")).encode()})
    sh = open_source(str(shard), None, processor, "vicuna_v1")
    got = [sh[i] for i in range(len(sh))]
    assert len(got) == 4 and got[0]["id"] == "ok"
    assert [(g.record_id, g.reason) for g in got[1:]] == [("k2", "malformed_json"), ("two", "image_count"),
                                                          ("nofile", "missing_image")]


def test_kinds_from_path_and_recipe(converted, tmp_path):
    root, src, out = converted
    assert source_kind(src) == "llava" and source_kind(out["arrow"]) == "arrow"
    assert source_kind(out["webdataset"]) == "webdataset" and source_kind(next(out["webdataset"].glob("*.tar"))) \
        == "webdataset"
    assert source_kind(src, "arrow") == "arrow"
    with pytest.raises(ValueError, match="unknown source kind 'tfrecord'"):
        source_kind(src, "tfrecord")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a datasets save_to_disk directory"):
        source_kind(tmp_path / "empty")
    r = load_recipe("recipes/tiny.yaml", [f"data.sources=[{{path: {out['arrow']}, kind: arrow}}]"])
    assert r.data.sources[0].kind == "arrow"
    with pytest.raises(RecipeError, match="kind"):
        load_recipe("recipes/tiny.yaml", ["data.sources=[{path: x, kind: tfrecord}]"])


def test_converter_refuses_a_non_empty_output_and_bad_sizes(converted, tmp_path, capsys):
    root, src, out = converted
    before = sorted(p.name for p in out["arrow"].iterdir())
    assert convert_main([str(src), "--to", "webdataset", str(out["arrow"])]) == 2
    assert "directory holds files mmkit did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out["arrow"].iterdir()) == before
    assert convert_main([str(src), "--to", "arrow", str(tmp_path / "o"), "--shard-size", "lots"]) == 2
    assert "--shard-size: cannot read 'lots'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_mixture_of_all_kinds_with_workers(converted, processor):  # noqa: F811
    root, src, out = converted
    cfg = DataConfig(sources=[DataSource(path=str(src), image_folder=str(root), count=6),
                              DataSource(path=str(out["arrow"]), weight=0.25),
                              DataSource(path=str(out["webdataset"]), weight=0.25)])
    ds = build_dataset(cfg, processor, "vicuna_v1", seed=3)
    assert ds.sizes == [6, 3, 3] and len(ds) == 12  # weights: fractions of the whole, beside the 6

    def batches(workers):
        sampler = StepBatchSampler(ds.modality_lengths, 4, 2, seed=5, group_by_modality_length=True, total_steps=5)
        loader = build_loader(ds, sampler, Collator(processor), workers)
        return [(b["ids"], b["input_ids"].tolist(), b["skips"]) for b in loader]

    inline, two = batches(0), batches(2)
    assert inline == two and len(inline) == 10
    assert any("jpeg" in ids for ids, _, _ in inline)


# --------------------------------------------------------------------------------------------- training on them


def _train_args(data: Path, folder: Path, *extra):
    return [f"data.sources=[{{path: {data}, image_folder: {folder}}}]", "stages[0].template=vicuna_v1",
            "stages[1].data=null", "stages[1].max_steps=2", *extra]


def _workers(n):
    return [f"data.num_workers={n}"]


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    src = _llava_dataset(root, n_good=20)
    out = {}
    for to in ("webdataset", "arrow"):  # the public command line, as a user runs it
        out[to] = root / to
        proc = subprocess.run([sys.executable, "-m", "mmkit.data.convert", str(src), "--image-folder", str(root),
                               "--to", to, str(out[to]), "--shard-size", "1KB"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"wrote 25 records to {out[to]} ({to}); skipped 3" in proc.stdout
        assert "skipping" in proc.stderr and "record missing: image file not found" in proc.stderr
    return root, out


@pytest.mark.parametrize("kind", ["webdataset", "arrow"])
def test_train_on_converted_data_and_resume_exactly_with_workers(training_data, kind, tmp_path):
    root, out = training_data
    data = out[kind]
    ref = tmp_path / "ref"
    run_train(ref, *_train_args(data, data, *_workers(0)))
    assert (ref / "final" / "model.safetensors").is_file()
    killed = tmp_path / "killed"
    p = run_train(killed, *_train_args(data, data, *_workers(2)), faults=["--kill-at", "0:2"], check=False)
    assert p.returncode == 137, p.stderr[-2000:]
    assert not (killed / "final").exists()
    run_train(killed, *_train_args(data, data, *_workers(2)), "--resume")
    a, b = weights(ref), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{kind}: resumed weights differ from the uninterrupted run"
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert os.path.isdir(killed / "checkpoints")
