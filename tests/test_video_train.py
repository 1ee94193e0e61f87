"""Video records in training data (LLaVA-Video layout): decoded in the dataset, bad videos counted, 2 CLI steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")

from tests.videos import write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# the tiny demo parts with video support: the builtin shapes tokenizer has no <video> word, so the video rows
# take id 0 (<unk>; the prompts below use known words only, so no other position holds it)
RECIPE = """
name: tiny-video
model:
  vision:
    name: clip
    config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
             image_size: 32, patch_size: 8}
    feature_layer: -1
    select: patch
  connector: {name: mlp2x_gelu}
  llm:
    name: llama
    config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4,
             num_key_value_heads: 4, max_position_embeddings: 256, tie_word_embeddings: false}
    tokenizer: builtin:shapes
  image: {aspect_ratio: square}
  template: vicuna_v1
  system_prompt: ""
  video_token_id: 0
  max_length: 256
  dtype: float32
data:
  sources: [{path: DATA}]
  num_workers: 1
  video: {num_frames: 4}
stages:
  - name: video
    trainable: {vision: full, connector: full, llm: full}
    lr: {vision: 1.0e-3, connector: 1.0e-3, llm: 1.0e-3}
    max_steps: 2
    global_batch_size: 4
    per_device_batch_size: 4
train:
  output_dir: OUT
  save_every: 0
"""


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    recs = []
    for k in range(6):
        write_video(tmp_path / "videos" / f"v{k}.mp4", frames=6 + k, size=(40, 32))
        recs.append({"id": f"v{k}", "video": f"videos/v{k}.mp4",
                     "conversations": [{"from": "human", "value": "<image>\nwhat is the shape ?"},
                                       {"from": "gpt", "value": "a red circle"}]})
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    recs.append({"id": "broken", "video": "videos/broken.mp4",
                 "conversations": [{"from": "human", "value": "<video>\nwhat is the shape ?"},
                                   {"from": "gpt", "value": "a red circle"}]})
    recs.append({"id": "gone", "video": "videos/none.mp4",
                 "conversations": [{"from": "human", "value": "<video>\nwhat is the shape ?"},
                                   {"from": "gpt", "value": "a red circle"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    return path


def _processor(tmp_path):
    from mmkit.builder import build
    from mmkit.processing.processor import MultimodalProcessor

    rp = tmp_path / "r.yaml"
    rp.write_text(RECIPE.replace("DATA", str(tmp_path / "data.json")).replace("OUT", str(tmp_path / "out")))
    model = build(rp)
    return model, MultimodalProcessor.for_model(model)


def test_video_records_decode_and_bad_ones_are_counted(tmp_path):
    from mmkit.data.collate import Collator
    from mmkit.data.records import LlavaDataset
    from mmkit.recipe import VideoConfig

    data = _dataset(tmp_path)
    model, proc = _processor(tmp_path)
    ds = LlavaDataset(data, None, proc, video=VideoConfig(num_frames=3, time_instruction=False))
    assert ds.skips.counts == {"missing_video": 1}
    sample = ds[0]
    assert sample["pixel_values_videos"][0].shape == (3, 3, 32, 32)
    assert sum(1 for t in sample["input_ids"] if t == 0) == proc.image_processor.num_video_tokens(3, 4) == 12
    failed = ds[len(ds) - 1]
    assert failed.reason == "corrupt_video" and "broken.mp4" in failed.detail
    batch = Collator(proc)([ds[0], ds[1], failed])
    assert batch["num_samples"] == 2 and batch["skips"]["counts"] == {"corrupt_video": 1}
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values_videos")})
    assert out.loss is not None and float(out.loss.detach()) > 0


def test_video_record_checks():
    from mmkit.data.records import check_record

    conv = [{"from": "human", "value": "<image> <video> hi"}, {"from": "gpt", "value": "a"}]
    assert check_record({"video": "v.mp4", "conversations": conv}, ".", check_files=False)[0] == "image_count"
    assert check_record({"video": "../v.mp4", "conversations": conv[:0] + [
        {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}]}, ".", check_files=False)[0] \
        == "image_outside"
    assert check_record({"video": 3, "conversations": conv}, ".")[0] == "structure"


def test_video_recipe_keys_are_checked(tmp_path):
    from mmkit.recipe import RecipeError, load_recipe

    rp = tmp_path / "r.yaml"
    rp.write_text(RECIPE.replace("DATA", "x.json").replace("OUT", str(tmp_path)).replace(
        "video: {num_frames: 4}", "video: {num_frames: 4, fps: -2}"))
    with pytest.raises(RecipeError, match=r"data\.video\.fps"):
        load_recipe(rp)


def test_train_two_steps_on_videos_through_the_cli(tmp_path):
    _dataset(tmp_path)
    rp = tmp_path / "r.yaml"
    rp.write_text(RECIPE.replace("DATA", str(tmp_path / "data.json")).replace("OUT", str(tmp_path / "out")))
    proc = subprocess.run([sys.executable, "-m", "mmkit.train", str(rp), "data.video.fps=4",
                           "data.video.max_frames=3"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    text = proc.stdout + proc.stderr
    assert "corrupt_video" in text and "missing_video" in text
