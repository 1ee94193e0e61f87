"""Export to llava-hf: transformers' Auto classes load it with no missing/unexpected keys and equal logits;
mmkit <-> llava-hf <-> mmkit round trips are bit-exact; models without a llava-hf form get a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import mmkit
from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tiny_llava_next_hf, tiny_llava_onevision_hf
from tests.test_parity_next import hf_inputs, photo

BUILDERS = {
    "llava": lambda: tiny_llava_hf("llama", "clip"),
    "llava_next": lambda: tiny_llava_next_hf("llama", "clip"),
    "llava_onevision": lambda: tiny_llava_onevision_hf(),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_round_trip_and_transformers_loads_export(kind, tmp_path):
    BUILDERS[kind]().save_pretrained(tmp_path / "orig")
    ours = mmkit.load(tmp_path / "orig").eval()
    ours.save(tmp_path / "mm")
    again = mmkit.load(tmp_path / "mm")
    a, b = ours.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    ours.save(tmp_path / "hf", format="llava-hf")
    hf, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__.lower().startswith(kind.replace("_", ""))
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    pix = ours.processor.process_images([photo(64, 48)])
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * pix["num_tokens"][0] + [6, 7]])
    with torch.no_grad():
        if kind == "llava":
            ref = hf(input_ids=ids, pixel_values=torch.stack(pix["pixel_values"])[:, 0]).logits
        else:
            pv, sizes = hf_inputs(pix)
            ref = hf(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        got = ours(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"]).logits
    assert torch.equal(got, ref) or (got - ref).abs().max().item() <= 1e-5

    back = mmkit.load(tmp_path / "hf")  # llava-hf -> mmkit is bit-exact too
    c = back.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the export uses the hub file layout
    keys = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert any(k.startswith("language_model.model.") for k in keys)


def test_models_without_llava_hf_form_say_why(tmp_path):
    linear = mmkit.build("recipes/tiny.yaml", ["model.connector.name=linear"])
    with pytest.raises(ValueError, match="no llava-hf form: LlavaMultiModalProjector is always Linear-GELU-Linear"):
        linear.save(tmp_path / "x", format="llava-hf")
    timm = mmkit.build("recipes/tiny.yaml", [
        "model.vision.name=timm",
        "model.vision.config={model_name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 2, embed_dim: 64,"
        " num_heads: 2}"])
    with pytest.raises(ValueError, match="has no llava-hf form: transformers' Llava classes take CLIP or SigLIP"):
        timm.save(tmp_path / "y", format="llava-hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_cli(tmp_path):
    tiny_llava_hf("qwen2", "siglip").save_pretrained(tmp_path / "src")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmkit.convert", *a], capture_output=True, text=True)
    ok = run(str(tmp_path / "src"), str(tmp_path / "mm"), "--to", "mmkit")
    assert ok.returncode == 0, ok.stderr
    assert "(llava-hf) ->" in ok.stdout
    ok = run(str(tmp_path / "mm"), str(tmp_path / "hf"), "--to", "llava-hf")
    assert ok.returncode == 0, ok.stderr
    bad = run(str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "mmkit")
    assert bad.returncode == 2 and "no such directory" in bad.stderr
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    bad = run(str(tmp_path / "odd"), str(tmp_path / "x"), "--to", "mmkit")
    assert bad.returncode == 2 and "unknown checkpoint layout" in bad.stderr and "'bert'" in bad.stderr
