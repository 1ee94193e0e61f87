"""Data pipeline: LLaVA JSON/JSONL datasets, bad-record handling, collate, mixtures, samplers."""

from __future__ import annotations

import json
import logging
import os
import random
import types
from collections import Counter
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmkit.data import sampler as S
from mmkit.data.collate import Collator
from mmkit.data.dataset import (
    DataError,
    FailedSample,
    LlavaDataset,
    SkipCounter,
    build_dataset,
    load_records,
    mixture_sizes,
)
from mmkit.demo.plugin import ShapesDemoOptions
from mmkit.demo.tokenizer import shapes_tokenizer
from mmkit.processing.image import ImageProcessor
from mmkit.processing.processor import IGNORE_INDEX, MultimodalProcessor
from mmkit.recipe import DataConfig, DataSource

TOKENS_PER_IMAGE = 16


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def processor():
    tok = shapes_tokenizer()
    return MultimodalProcessor(tok, ImageProcessor.clip(32, aspect_ratio="square"), "vicuna_v1", "<image>",
                               tok.convert_tokens_to_ids("<image>"), TOKENS_PER_IMAGE, 4, max_length=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    for k, color in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (32 + 8 * k, 32), color).save(root / "img" / f"{k}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image at all" * 3)
    return root


def conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]


def rec(rid, image=None, turns=("<image>\nwhat color is the circle ?", "red")):
    r = {"id": rid, "conversations": conv(*turns)}
    if image is not None:
        r["image"] = image
    return r


GOOD = [
    rec("a", "img/0.png"),
    rec("b", "img/1.png", ("what shape is the red one ? <image>", "circle", "how many shapes ?", "two")),
    rec("c", None, ("is there a red circle ?", "yes")),  # text-only
    rec("d", ["img/2.png", "img/3.png"], ("<image>\n<image>\nhow many shapes ?", "three")),  # multi-image
]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised(ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# --------------------------------------------------------------------------------------------- loading


def test_json_and_jsonl_load_the_same(processor, folder):
    pj = write_json(folder / "good.json", GOOD)
    pl = write_jsonl(folder / "good.jsonl", GOOD)
    assert load_records(pj) == load_records(pl) == GOOD
    dj = LlavaDataset(pj, folder, processor, "vicuna_v1")
    dl = LlavaDataset(pl, folder, processor, "vicuna_v1")
    assert len(dj) == len(dl) == 4 and dj.skips.total == dl.skips.total == 0
    for i in range(4):
        a, b = dj[i], dl[i]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["id"] == GOOD[i]["id"]
    # image_folder defaults to the data file's directory
    assert LlavaDataset(pj, None, processor).image_folder == str(folder)


def test_samples_single_multi_and_text_only(processor, folder):
    ds = LlavaDataset(write_json(folder / "good.json", GOOD), folder, processor, "vicuna_v1")
    tok = processor.tokenizer
    img_id = processor.image_token_id
    a, b, c, d = (ds[i] for i in range(4))

    assert len(a["pixel_values"]) == 1 and a["pixel_values"][0].shape == (1, 3, 32, 32)
    assert a["input_ids"].count(img_id) == TOKENS_PER_IMAGE
    assert supervised(a["input_ids"], a["labels"]) == ids(tok, "red</s>")
    # a trailing <image> is moved to the front of its turn (LLaVA's preprocess_multimodal), two answers supervised
    assert b["input_ids"].count(img_id) == TOKENS_PER_IMAGE and b["image_sizes"] == [(32, 40)]
    assert supervised(b["input_ids"], b["labels"]) == ids(tok, "circle</s>two</s>")
    # text-only: no image at all
    assert c["pixel_values"] == [] and img_id not in c["input_ids"]
    assert supervised(c["input_ids"], c["labels"]) == ids(tok, "yes</s>")
    # multi-image: both images, in order, each expanded
    assert len(d["pixel_values"]) == 2 and d["image_sizes"] == [(32, 48), (32, 56)]
    assert d["input_ids"].count(img_id) == 2 * TOKENS_PER_IMAGE

    # LLaVA's lengths: words over all turns (+128 per image); modality lengths negative for text-only
    words = [8, 14, 7, 7]  # "<image>" counts as a word, as in LLaVA
    assert ds.lengths == [8 + 128, 14 + 128, 7, 7 + 256]
    assert ds.modality_lengths == [8, 14, -7, 7]
    assert [sum(len(t["value"].split()) for t in r["conversations"]) for r in GOOD] == words


def test_leading_gpt_turn_dropped(processor, folder):
    r = {"id": "g", "image": "img/0.png", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "<image>\nhow many shapes ?"},
        {"from": "gpt", "value": "one"}]}
    ds = LlavaDataset(write_json(folder / "lead.json", [r]), folder, processor, "vicuna_v1")
    assert len(ds) == 1
    s = ds[0]
    assert supervised(s["input_ids"], s["labels"]) == ids(processor.tokenizer, "one</s>")


BAD = {
    "missing_image": rec("bad-missing", "img/nope.png"),
    "roles": {"id": "bad-roles", "image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>\nhow many shapes ?"}, {"from": "human", "value": "one"}]},
    "image_count": rec("bad-count", "img/0.png", ("how many shapes ?", "one")),
    "empty_answer": rec("bad-empty", "img/0.png", ("<image>\nhow many shapes ?", "  ")),
    "structure": {"id": "bad-structure", "conversations": "not a list"},
    "image_outside": rec("bad-outside", "../img/0.png"),  # exists, but outside image_folder
}


def test_absolute_image_paths_are_refused(processor, folder):
    path = write_json(folder / "abs.json", [GOOD[0], rec("abs", str((folder / "img" / "0.png").resolve()))])
    ds = LlavaDataset(path, folder, processor, "vicuna_v1")
    assert len(ds) == 1 and ds.skips.counts == {"image_outside": 1}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_skipped_with_counted_warning(processor, folder, caplog, reason):
    path = write_json(folder / f"bad_{reason}.json", [GOOD[0], BAD[reason], GOOD[2]])
    with caplog.at_level(logging.WARNING, logger="mmkit.data"):
        ds = LlavaDataset(path, folder, processor, "vicuna_v1")
    assert len(ds) == 2 and [r[1] for r in ds.records] == ["a", "c"]
    assert ds.skips.counts == {reason: 1} and ds.skips.phases["index"] == 1
    rid = BAD[reason]["id"]
    hits = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert hits and str(path) in hits[0]
    assert "skipped 1 of 3 records" in caplog.text
    assert rid in ds.skips.summary() and reason in ds.skips.summary()

    with pytest.raises(DataError) as ei:
        LlavaDataset(path, folder, processor, "vicuna_v1", strict=True)
    assert ei.value.reason == reason and ei.value.record_id == rid and ei.value.file == str(path)
    assert rid in str(ei.value) and str(path) in str(ei.value)


def test_malformed_json_line(processor, folder, caplog):
    path = write_jsonl(folder / "broken.jsonl", GOOD[:2], raw_lines=['{"id": "x", "conversations": [', ""])
    with open(path, "a") as f:
        f.write(json.dumps(GOOD[2]) + "\n")
    with caplog.at_level(logging.WARNING, logger="mmkit.data"):
        ds = LlavaDataset(path, folder, processor, "vicuna_v1")
    assert len(ds) == 3 and ds.skips.counts == {"malformed_json": 1}
    assert f"{path}:3" in caplog.text and "line 3" in caplog.text
    # the record after the blank line keeps its own line number
    assert ds.records[2][0] == f"{path}:5"
    with pytest.raises(DataError, match=f"{path}:3"):
        LlavaDataset(path, folder, processor, strict=True)
    with pytest.raises(DataError):
        load_records(path, strict=True)
    counter = SkipCounter()
    assert load_records(path, skips=counter) == GOOD[:3] and counter.counts == {"malformed_json": 1}
    # a broken JSON list cannot be partially read: it raises, naming the line
    (folder / "broken.json").write_text('[{"id": 1},\n{oops}]')
    with pytest.raises(DataError, match="broken.json:2"):
        LlavaDataset(folder / "broken.json", folder, processor)


def test_corrupt_image_dropped_at_load_time(processor, folder, caplog):
    path = write_json(folder / "corrupt.json", [GOOD[0], rec("bad-corrupt", "img/corrupt.png")])
    ds = LlavaDataset(path, folder, processor, "vicuna_v1")
    assert len(ds) == 2 and ds.skips.total == 0  # only discoverable when decoding
    with caplog.at_level(logging.WARNING, logger="mmkit.data"):
        out = ds[1]
    assert isinstance(out, FailedSample) and out.reason == "corrupt_image" and out.record_id == "bad-corrupt"
    assert "bad-corrupt" in caplog.text and str(path) in caplog.text
    batch = Collator(processor)([ds[0], out])
    assert batch["num_samples"] == 1 and batch["num_skipped"] == 1 and batch["num_indices"] == 2
    assert batch["skips"]["counts"] == {"corrupt_image": 1} and batch["ids"] == ["a"]
    assert batch["input_ids"].shape[0] == 1 and len(batch["pixel_values"]) == 1
    with pytest.raises(DataError) as ei:
        LlavaDataset(path, folder, processor, "vicuna_v1", strict=True)[1]
    assert ei.value.reason == "corrupt_image" and ei.value.record_id == "bad-corrupt"


def test_too_long_truncation_and_drop(processor, folder):
    long_first = rec("long", "img/0.png", ("<image>\n" + "how many shapes ? " * 10, "two"))
    multi = rec("multi", "img/0.png", ("<image>\nhow many shapes ?", "two", "what color is the circle ?", "red",
                                       "is there a red circle ?", "yes"))
    ds = LlavaDataset(write_json(folder / "long.json", [long_first, multi]), folder, processor, "vicuna_v1",
                      max_length=TOKENS_PER_IMAGE + 45)
    out = ds[0]
    assert isinstance(out, FailedSample) and out.reason == "too_long"
    s = ds[1]  # trailing exchanges dropped, never the image; something is still supervised
    assert len(s["input_ids"]) <= TOKENS_PER_IMAGE + 45
    assert s["input_ids"].count(processor.image_token_id) == TOKENS_PER_IMAGE
    assert supervised(s["input_ids"], s["labels"])[:2] == ids(processor.tokenizer, "two</s>")


def test_image_in_a_truncated_exchange_is_dropped(processor, folder):
    r = rec("late-image", ["img/0.png", "img/1.png"],
            ("<image>\nhow many shapes ?", "one", "<image>\nhow many shapes ?", "two"))
    ds = LlavaDataset(write_json(folder / "late.json", [r]), folder, processor, "vicuna_v1",
                      max_length=TOKENS_PER_IMAGE + 45)
    s = ds[0]
    assert s["input_ids"].count(processor.image_token_id) == TOKENS_PER_IMAGE
    assert len(s["pixel_values"]) == 1 and s["image_sizes"] == [(32, 32)]


class _AllMasked(MultimodalProcessor):
    def encode_conversation(self, *a, **k):
        out = super().encode_conversation(*a, **k)
        out["labels"] = [IGNORE_INDEX] * len(out["labels"])
        return out


def test_all_masked_sample_is_never_returned(processor, folder):
    p = _AllMasked(processor.tokenizer, processor.image_processor, "vicuna_v1", "<image>",
                   processor.image_token_id, TOKENS_PER_IMAGE, 4, max_length=256)
    ds = LlavaDataset(write_json(folder / "good.json", GOOD), folder, p, "vicuna_v1")
    assert all(isinstance(ds[i], FailedSample) and ds[i].reason == "no_labels" for i in range(len(ds)))
    batch = Collator(p)([ds[0], ds[1]])
    assert batch["num_samples"] == 0 and batch["num_skipped"] == 2 and "input_ids" not in batch


def test_plain_template_takes_one_exchange(processor, folder):
    path = write_json(folder / "plain.json", [GOOD[0], GOOD[1]])
    ds = LlavaDataset(path, folder, processor, "plain")
    assert len(ds) == 1 and ds.skips.counts == {"conversation": 1}
    s = ds[0]
    assert supervised(s["input_ids"], s["labels"]) == ids(processor.tokenizer, "red\n")


def test_dataloader_with_workers_reports_skips(processor, folder):
    records = []
    for k in range(12):
        text_only = rec(f"txt{k}", None, ("how many shapes ?", "one"))
        records.append(rec(f"ok{k}", f"img/{k % 4}.png") if k % 3 else text_only)
    records += [rec("bad-corrupt1", "img/corrupt.png"), BAD["roles"], rec("bad-corrupt2", "img/corrupt.png"),
                BAD["missing_image"]]
    random.Random(0).shuffle(records)
    ds = build_dataset(DataConfig(sources=[DataSource(path="mixed.json")]), processor, "vicuna_v1",
                       base_dir=write_json(folder / "mixed.json", records).parent)
    assert len(ds) == 14 and ds.skips.counts == {"roles": 1, "missing_image": 1}
    # one step of the whole dataset in 7 micro-batches of 2
    sampler = S.StepBatchSampler(ds.modality_lengths, 14, 2, seed=3, group_by_modality_length=True)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=Collator(processor))
    counter = ds.skips.copy()
    seen, kept = [], 0
    for batch in loader:
        counter.merge(batch["skips"])
        kept += batch["num_samples"]
        seen += batch["ids"]
        if batch["num_samples"]:
            assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()  # every kept row is supervised
    assert kept == 12 and sorted(seen) == sorted(r["id"] for r in records if r["id"].startswith(("ok", "txt")))
    assert counter.counts == {"roles": 1, "missing_image": 1, "corrupt_image": 2}
    assert counter.phases == {"index": 2, "load": 2}
    text = counter.summary()
    assert "2 records skipped when indexing, 2 samples dropped when loading" in text and "bad-corrupt" in text


def test_collator_pads_right_and_mixes_modalities(processor, folder):
    ds = LlavaDataset(write_json(folder / "good.json", GOOD), folder, processor, "vicuna_v1")
    items = [ds[i] for i in range(4)]
    batch = Collator(processor)(items)
    lens = [len(s["input_ids"]) for s in items]
    assert batch["input_ids"].shape == (4, max(lens))
    assert batch["attention_mask"].sum(1).tolist() == lens
    for i, s in enumerate(items):
        assert batch["input_ids"][i, :lens[i]].tolist() == s["input_ids"]
        assert (batch["labels"][i, lens[i]:] == IGNORE_INDEX).all()
    assert len(batch["pixel_values"]) == 4 and batch["image_sizes"][0] == (32, 32)
    assert batch["num_samples"] == 4 and batch["num_skipped"] == 0 and batch["skips"]["counts"] == {}


# --------------------------------------------------------------------------------------------- mixtures


def test_mixture_sizes():
    assert mixture_sizes([10, 20], [None, None], [None, None]) == [None, None]
    assert mixture_sizes([10, 20], [None, None], [5, 45]) == [5, 45]
    # all weighted: as many samples as all sources together, split by weight
    assert mixture_sizes([10, 20], [3, 1], [None, None]) == [23, 7]
    assert mixture_sizes([100, 100, 100], [1, 1, 1], [None] * 3) == [100, 100, 100]
    # fractions of the whole next to fixed sources: 30 fixed = 60% -> 50 in all
    assert mixture_sizes([10, 20, 7], [None, 0.3, 0.1], [30, None, None]) == [30, 15, 5]
    assert mixture_sizes([10, 20], [None, 0.5], [None, None]) == [None, 10]
    with pytest.raises(ValueError, match="sum to < 1"):
        mixture_sizes([10, 20], [None, 1.0], [None, None])
    with pytest.raises(ValueError, match="not both"):
        mixture_sizes([10], [0.5], [3])


def test_mixture_dataset_proportions_and_determinism(processor, folder):
    a = write_jsonl(folder / "mix_a.jsonl", [rec(f"a{k}", f"img/{k % 4}.png") for k in range(10)])
    b = write_jsonl(folder / "mix_b.jsonl", [rec(f"b{k}", None, ("how many shapes ?", "one")) for k in range(4)])
    cfg = DataConfig(sources=[DataSource(path=a.name, image_folder="."), DataSource(path=b.name, count=9)])
    ds = build_dataset(cfg, processor, "vicuna_v1", base_dir=folder, seed=1)
    assert len(ds) == 19 and ds.sizes == [10, 9]
    b_local = [j for s, j in zip(ds.index_source, ds.index_local) if s == 1]
    assert sorted(b_local) == sorted([0, 1, 2, 3] * 2 + b_local[8:]) and len(set(b_local[8:])) == 1
    assert ds.modality_lengths.count(-5) == 9 and ds[18]["id"].startswith("b")

    # weights: fractions of a mixture as large as both sources (14): 3.5 -> 4 (largest remainder, first on ties),
    # 10.5 -> 10; the 4-record text source is repeated to fill its share
    cfg = DataConfig(sources=[DataSource(path=a.name, weight=0.25), DataSource(path=b.name, weight=0.75)])
    ds1 = build_dataset(cfg, processor, "vicuna_v1", base_dir=folder, seed=1)
    ds2 = build_dataset(cfg, processor, "vicuna_v1", base_dir=folder, seed=1)
    assert ds1.sizes == [4, 10] and len(ds1) == 14
    assert sum(x < 0 for x in ds1.modality_lengths) == 10  # the text-only source's share
    assert ds1.index_local == ds2.index_local  # deterministic given the seed
    reps = sorted(Counter(j for s, j in zip(ds1.index_source, ds1.index_local) if s == 1).values())
    assert reps == [2, 2, 3, 3]  # every record twice, then 2 distinct seeded picks
    cfg = DataConfig(sources=[DataSource(path=a.name, count=3), DataSource(path=b.name)])
    picks = {tuple(build_dataset(cfg, processor, "vicuna_v1", base_dir=folder, seed=s).index_local[:3])
             for s in range(6)}
    assert len(picks) > 1 and all(len(set(p)) == 3 for p in picks)  # seeded subsample without repetition
    with pytest.raises(DataError, match="not found"):
        build_dataset(DataConfig(sources=[DataSource(path="nope.json")]), processor, base_dir=folder)
    write_json(folder / "all_bad.json", [BAD["roles"], BAD["image_count"]])
    with pytest.raises(DataError, match="no valid record") as ei:
        build_dataset(DataConfig(sources=[DataSource(path="all_bad.json")]), processor, base_dir=folder)
    assert "bad-roles" in str(ei.value)


def test_registered_shapes_source_by_template(processor, tmp_path):
    plugins = {"shapes_demo": ShapesDemoOptions(train_images=5, heldout_images=2, image_size=32, seed=0)}
    cfg = DataConfig(sources=[DataSource(path="shapes:auto")])
    s1 = build_dataset(cfg, processor, "plain", data_dir=tmp_path, plugins=plugins)
    s2 = build_dataset(cfg, processor, "vicuna_v1", data_dir=tmp_path, plugins=plugins)
    assert len(s1) == len(s2) == 5 and s1.skips.total == s2.skips.total == 0
    assert (tmp_path / "shapes" / "stage1.json").is_file()
    assert len(s1.datasets[0].records[0][3]) == 2 and len(s2.datasets[0].records[0][3]) == 10
    tok = processor.tokenizer
    x = s1[0]
    assert tok.decode(supervised(x["input_ids"], x["labels"])).startswith("a ")
    explicit = build_dataset(DataConfig(sources=[DataSource(path="shapes:stage1")]), processor,
                             "vicuna_v1", data_dir=tmp_path, plugins=plugins)
    assert explicit.datasets[0].path.endswith("stage1.json")
    with pytest.raises(ValueError, match="data_dir"):
        build_dataset(cfg, processor, "plain")
    with pytest.raises(ValueError, match=r"shapes:cats: unknown split 'cats'; choices: shapes:auto, shapes:stage1"):
        build_dataset(DataConfig(sources=[DataSource(path="shapes:cats")]), processor, data_dir=tmp_path)


def test_unknown_data_source_scheme_is_one_line(processor, tmp_path):
    with pytest.raises(ValueError) as err:
        build_dataset(DataConfig(sources=[DataSource(path="synthetic:shapes")]), processor, data_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith("synthetic:shapes: unknown data source 'synthetic';") and "choices: " in msg
    assert "shapes" in msg.split("choices: ")[1] and "\n" not in msg
    with pytest.raises(ValueError, match=r"unknown data source 'shapez'; did you mean 'shapes'\?"):
        build_dataset(DataConfig(sources=[DataSource(path="shapez:auto")]), processor, data_dir=tmp_path)


def test_plain_paths_with_a_colon_or_none_stay_files(processor, folder, tmp_path):
    odd = write_json(tmp_path / "my:data.json", [rec("c", "img/0.png", ("<image>\nhow many shapes ?", "one"))])
    ds = build_dataset(DataConfig(sources=[DataSource(path=odd.name, image_folder=str(folder))]), processor,
                       base_dir=tmp_path)
    assert len(ds) == 1 and ds.datasets[0].path == str(odd)  # an existing file: no scheme lookup
    with pytest.raises(DataError, match="data file not found"):  # a plain path as before
        build_dataset(DataConfig(sources=[DataSource(path="missing/file.json")]), processor, base_dir=tmp_path)


def test_data_source_registered_at_runtime(processor, folder, tmp_path):
    from mmkit.registry import data_sources

    seen = []
    good = write_json(folder / "good.json", GOOD)

    def resolve(arg, ctx):
        seen.append((arg, ctx.template, ctx.data_dir, dict(ctx.plugins)))
        return str(good), str(folder)

    data_sources.register("fake_src", obj=resolve)
    try:
        ds = build_dataset(DataConfig(sources=[DataSource(path="fake_src:x/y")]), processor, "plain",
                           data_dir=tmp_path, plugins={"p": 1})
    finally:
        data_sources.unregister("fake_src")
    assert seen == [("x/y", "plain", tmp_path, {"p": 1})] and ds.datasets[0].path == str(good)
    assert "fake_src" not in data_sources


def test_skip_counter_merge():
    a, b = SkipCounter(max_examples=2), SkipCounter()
    a.add("roles", "f.json", "1", "x")
    for k in range(3):
        b.add("corrupt_image", "g.json", str(k), phase="load")
    a.merge(b.to_dict()).merge(None)
    assert a.counts == {"roles": 1, "corrupt_image": 3} and a.total == 4 and len(a.examples["corrupt_image"]) == 2
    assert a.phases == {"index": 1, "load": 3}
    assert SkipCounter.from_dict(a.to_dict()).counts == a.counts
    assert "no records skipped" in SkipCounter().summary()


# --------------------------------------------------------------------------------------------- sampler


def test_split_to_even_chunks_by_hand():
    lengths = [10, 9, 8, 3, 2, 1]
    assert S.split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 4], [1, 2, 5]]
    assert S.split_to_even_chunks([0, 1, 2, 3, 4], lengths, 2) == [[0, 2, 4], [1, 3]]
    assert S.split_to_even_chunks([5, 4], lengths, 2) == [[5], [4]]


def test_modality_grouping_by_hand(monkeypatch):
    perms = iter([[4, 0, 3, 1, 2], [2, 0, 1], [2, 0, 1]])  # image randperm, text randperm, megabatch randperm
    monkeypatch.setattr(S, "_randperm", lambda n, g: torch.tensor(next(perms)))
    lengths = [5, -3, 2, -7, 9, 4, -1, 6]
    # images: global (0,2,4,5,7) lengths (5,2,9,4,6); perm -> [4,0][3,1][2] local -> sorted desc -> [7,0][5,2][4]
    # text: global (1,3,6) lengths (3,7,1); perm -> [2,0][1] -> sorted desc -> [0,2][1] local -> [1,6][3]
    # tails [4] + [3] set aside; [[7,0],[5,2],[1,6]] permuted by [2,0,1]; sorted tail [3,4] last
    assert S.modality_length_grouped_indices(lengths, 1, 2) == [1, 6, 7, 0, 5, 2, 3, 4]


def test_modality_grouping_single_modality_megabatches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) * rng.choice([1, 1, -1]) for _ in range(203)]
    bs, ws = 4, 3
    g = torch.Generator().manual_seed(0)
    order = S.modality_length_grouped_indices(lengths, bs, ws, g)
    assert sorted(order) == list(range(203))
    mb = bs * ws
    n_mm = sum(x > 0 for x in lengths)
    n_lang = 203 - n_mm
    tail = (n_mm - 1) % mb + 1 + (n_lang - 1) % mb + 1
    head, last = order[:-tail], order[-tail:]
    assert len(head) % mb == 0
    for k in range(0, len(head), mb):
        signs = {lengths[i] > 0 for i in head[k:k + mb]}
        assert len(signs) == 1
        # each chunk of a megabatch is one micro-batch; LLaVA sorts the megabatch by length (desc) before splitting
        chunk_max = [max(abs(lengths[i]) for i in head[k + c * bs:k + (c + 1) * bs]) for c in range(ws)]
        assert max(chunk_max) == max(abs(lengths[i]) for i in head[k:k + mb])
    assert last == sorted(last) and {lengths[i] > 0 for i in last} == {True, False}
    # deterministic in the generator state; another seed gives another order
    assert S.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(0)) == order
    assert S.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(1)) != order


def _llava_trainer_module():
    """``llava/train/llava_trainer.py`` from the llava-torch wheel (haotian-liu/LLaVA 1.2.2.post1): a wheel / source
    directory named by MMKIT_LLAVA_TORCH, or an installed ``llava``. Executed as a lone module (no
    ``llava/__init__`` and its model imports)."""
    import importlib.util

    code = None
    where = os.environ.get("MMKIT_LLAVA_TORCH")
    if where and os.path.isfile(where):
        with zipfile.ZipFile(where) as z:
            code = z.read("llava/train/llava_trainer.py").decode()
    elif where and os.path.isdir(where):
        f = Path(where) / "llava" / "train" / "llava_trainer.py"
        code = f.read_text() if f.is_file() else None
    else:
        spec = importlib.util.find_spec("llava")
        if spec is not None and spec.submodule_search_locations:
            f = Path(list(spec.submodule_search_locations)[0]) / "train" / "llava_trainer.py"
            code = f.read_text() if f.is_file() else None
    if code is None:
        return None
    import transformers.trainer as tt

    had = hasattr(tt, "ALL_LAYERNORM_LAYERS")
    if not had:
        tt.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    try:
        mod = types.ModuleType("llava_trainer_oracle")
        exec(compile(code, "llava/train/llava_trainer.py", "exec"), mod.__dict__)
    finally:
        if not had:
            del tt.ALL_LAYERNORM_LAYERS
    return mod


def test_modality_grouping_matches_llava():
    try:
        ref = _llava_trainer_module()
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"llava-torch not importable: {e}")
    if ref is None:
        pytest.skip("llava-torch not available (set MMKIT_LLAVA_TORCH to the llava_torch-1.2.2.post1 wheel)")
    rng = random.Random(1)
    for trial in range(12):
        n = rng.randint(1, 150)
        p_text = [0.0, 0.3, 1.0][trial % 3]
        lengths = [rng.randint(1, 300) * (-1 if rng.random() < p_text else 1) for _ in range(n)]
        bs, ws = rng.randint(1, 6), rng.randint(1, 4)
        torch.manual_seed(trial)  # LLaVA's trainer: generator=None -> torch's global generator
        expected = ref.get_modality_length_grouped_indices(lengths, bs, ws, generator=None)
        got = S.modality_length_grouped_indices(lengths, bs, ws, torch.Generator().manual_seed(trial))
        assert got == expected, (n, bs, ws)
        pos = [abs(x) for x in lengths]
        torch.manual_seed(trial)
        assert S.length_grouped_indices(pos, bs, ws, torch.Generator().manual_seed(trial)) == \
            ref.get_length_grouped_indices(pos, bs, ws, generator=None)
        assert S.split_to_even_chunks(list(range(n)), pos, ws) == ref.split_to_even_chunks(list(range(n)), pos, ws)
    # the sampler's epoch order is LLaVA's sampler with the global generator seeded with seed + epoch
    # (one process, ws micro-batches of bs per step: LLaVA's world_size = processes x accumulation)
    smp = S.StepBatchSampler(lengths, bs * ws, bs, seed=5, group_by_modality_length=True)
    torch.manual_seed(7)
    assert smp.epoch_order(2) == list(ref.LengthGroupedSampler(bs, ws, lengths=lengths, group_by_modality=True))


def _step_sampler(lengths, group, **kw):
    return S.StepBatchSampler(lengths if group else len(lengths), group_by_modality_length=group, **kw)


@pytest.mark.parametrize("group", [True, False], ids=["grouped", "random"])
def test_sampler_resume_from_a_step(group):
    lengths = [((k * 37) % 23 + 1) * (1 if k % 4 else -1) for k in range(50)]
    kw = dict(global_batch=6, per_device_batch=3, seed=11, total_steps=20)  # 8 steps per epoch, 2 left over

    full = list(_step_sampler(lengths, group, **kw))
    assert len(_step_sampler(lengths, group, **kw)) == len(full) == 40  # 2 micro-batches per step
    assert all(len(b) == 3 for b in full)
    smp = _step_sampler(lengths, group, **kw)
    assert smp.steps_per_epoch == 8 and smp.accum == 2
    for epoch in range(3):  # a step is order[s*G:(s+1)*G]; each epoch takes 48 distinct samples
        order = smp.epoch_order(epoch)
        assert sorted(order) == list(range(50))
        seen = [i for b in full[epoch * 16:(epoch + 1) * 16] for i in b]
        assert seen == order[:len(seen)] and len(set(seen)) == len(seen)

    for start in (1, 5, 8, 13, 19, 20):  # mid-epoch, at an epoch boundary, the last step, past the end
        r = _step_sampler(lengths, group, start_step=start, **kw)
        assert len(r) == 40 - 2 * start and list(r) == full[2 * start:]

    # epoch orders differ and are reproducible
    other = _step_sampler(lengths, group, **kw)
    assert other.epoch_order(1) == smp.epoch_order(1) != smp.epoch_order(0)
    assert list(other) == full
    assert _step_sampler(lengths, group, **{**kw, "seed": 12}).epoch_order(0) != smp.epoch_order(0)
    with pytest.raises(ValueError, match="start_step"):
        _step_sampler(lengths, group, start_step=21, **kw)


def test_sampler_resume_through_dataloader():
    lengths = [((k * 13) % 17 + 1) * (1 if k % 3 else -1) for k in range(40)]
    ds = list(range(40))
    collate = lambda xs: xs  # noqa: E731

    def make(start=0):
        return S.StepBatchSampler(lengths, 8, 4, seed=0, group_by_modality_length=True, start_step=start,
                                  total_steps=12)

    batches = list(DataLoader(ds, batch_sampler=make(), collate_fn=collate))
    assert batches == list(make()) and len(batches) == 24
    loader = DataLoader(ds, batch_sampler=make(), collate_fn=collate, num_workers=2, prefetch_factor=2)
    assert list(loader) == batches  # workers: the same micro-batches in the same order
    got = []
    for k, b in enumerate(DataLoader(ds, batch_sampler=make(), collate_fn=collate, num_workers=2)):
        got.append(b)
        if k == 5:  # killed after 3 steps of 2 micro-batches (workers had prefetched more)
            break
    rest = list(DataLoader(ds, batch_sampler=make(start=3), collate_fn=collate, num_workers=2))
    assert got + rest == batches


@pytest.mark.parametrize("group", [True, False], ids=["grouped", "random"])
def test_sampler_ranks_cover_each_global_batch(group):
    lengths = [(k % 7 + 1) * (1 if k % 5 else -1) for k in range(45)]
    G, b, steps = 8, 2, 12  # 5 steps per epoch
    one = _step_sampler(lengths, group, global_batch=G, per_device_batch=b, seed=3, total_steps=steps)
    single = list(one)
    assert len(single) == steps * 4
    for world in (2, 4):
        ranks = [list(_step_sampler(lengths, group, global_batch=G, per_device_batch=b, world=world, rank=r, seed=3,
                                    total_steps=steps)) for r in range(world)]
        accum = G // (b * world)
        assert all(len(mine) == steps * accum for mine in ranks)
        for s in range(steps):
            step_batches = [mb for mine in ranks for mb in mine[s * accum:(s + 1) * accum]]
            # rank r takes the r-th contiguous share of the global batch: together, exactly one process's step
            assert step_batches == single[s * 4:(s + 1) * 4]
            epoch, in_epoch = divmod(s, one.steps_per_epoch)
            assert [i for mb in step_batches for i in mb] == one.epoch_order(epoch)[in_epoch * G:(in_epoch + 1) * G]
    r1 = list(_step_sampler(lengths, group, global_batch=G, per_device_batch=b, world=2, rank=1, seed=3))
    assert r1[:2] == [one.epoch_order(0)[4:6], one.epoch_order(0)[6:8]]


def test_sampler_single_modality_and_validation():
    lengths = [5, 3, 8, 1, 9, 2]
    g = torch.Generator().manual_seed(0)
    assert sorted(S.modality_length_grouped_indices(lengths, 2, 1, g)) == list(range(6))
    with pytest.raises(ValueError, match="non-zero"):
        S.modality_length_grouped_indices([1, 0, -1], 1, 1)
    with pytest.raises(ValueError, match="modality_lengths"):
        S.StepBatchSampler(6, 2, 1, group_by_modality_length=True)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        S.StepBatchSampler([], 2, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        S.StepBatchSampler(lengths, 6, 4)
    with pytest.raises(ValueError, match="rank"):
        S.StepBatchSampler(lengths, 4, 2, world=2, rank=2)
    assert sorted(i for b in S.StepBatchSampler(lengths, 6, 2, group_by_modality_length=True) for i in b) == \
        list(range(6))  # one modality only: plain length grouping
