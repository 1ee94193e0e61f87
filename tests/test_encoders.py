"""Every encoder backend behind one interface: selected layer = the backbone's own hidden state, dead blocks
never run, frozen by default; LLM presets; hub ids that cannot be fetched fail in one sentence."""

from __future__ import annotations

import pytest
import torch

import mmkit
from mmkit.encoders.base import HubUnavailableError
from mmkit.recipe import VisionConfig, load_recipe
from mmkit.registry import encoders

TIMM = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48,
        "num_heads": 2}
OPEN_CLIP = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 3, "heads": 2}


def build(name, config, layer=-2, select="patch"):
    torch.manual_seed(0)
    return encoders.get(name)(VisionConfig(name=name, config=config, feature_layer=layer, select=select)).eval()


def count_calls(blocks):
    calls = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(blocks)]
    return calls, handles


@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_timm_matches_its_own_intermediates(layer):
    enc = build("timm", TIMM, layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = enc(x)
        # timm's own forward_intermediates: hidden state after block k, no final norm
        index = layer if layer >= 0 else 3 + 1 + layer
        ref = enc.model.forward_intermediates(x, indices=[index - 1], norm=False, output_fmt="NLC",
                                              intermediates_only=True, return_prefix_tokens=True)[0]
    tokens, prefix = ref if isinstance(ref, tuple) else (ref, None)
    assert got.shape == (2, 16, 48) and torch.allclose(got, tokens, atol=1e-6)


def test_open_clip_selects_the_right_block_and_skips_dead_ones():
    enc = build("open_clip", OPEN_CLIP, -2, "cls_patch")
    x = torch.randn(2, 3, 32, 32)
    calls, handles = count_calls(enc.blocks())
    with torch.no_grad():
        got = enc(x)
        v = enc.visual
        ref = v._embeds(x)
        for blk in list(v.transformer.resblocks)[:2]:
            ref = blk(ref)
    for h in handles:
        h.remove()
    assert calls == [0, 1, 0, 1]  # 2 of 3 blocks, in our pass and in the reference pass
    assert got.shape == (2, 17, 48) and torch.allclose(got, ref, atol=1e-6)
    dead = {id(p) for p in enc.dead_parameters()}
    assert {id(p) for p in enc.blocks()[-1].parameters()} <= dead and id(enc.visual.class_embedding) not in dead


def test_clip_layer_minus_two_equals_hidden_states():
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=28, patch_size=14).to_dict()
    enc = build("clip", cfg, -2)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        full = enc.tower(x, output_hidden_states=True) if hasattr(enc.tower, "forward") else None
        got = enc(x)
    assert torch.allclose(got, full.hidden_states[-2][:, 1:], atol=1e-6)


def test_encoders_frozen_by_default_and_mistral_preset():
    model = mmkit.build("recipes/tiny.yaml", [
        "model.llm.name=mistral", "model.template=null",
        "model.llm.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4,"
        " num_key_value_heads: 2}"])
    assert model.llm.config.model_type == "mistral" and model.template == "mistral_instruct"
    assert model.summary()["vision"]["trainable"] == 0
    out = model(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape[-1] == len(model.tokenizer)


def test_unreachable_hub_id_is_one_sentence():
    recipe = load_recipe("recipes/tiny.yaml", ["model.vision.pretrained=no-such-org/no-such-vision-model"])
    with pytest.raises(HubUnavailableError) as err:
        mmkit.build(recipe)
    msg = str(err.value)
    assert msg.startswith("model.vision.pretrained: could not load vision encoder 'no-such-org/no-such-vision-model'")
    assert "hf download no-such-org/no-such-vision-model --local-dir DIR" in msg and "\n" not in msg


def test_no_network_fails_at_once_without_hub_offline(monkeypatch):
    import socket

    from mmkit import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    calls = []

    def loader(name, **kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    with pytest.raises(HubUnavailableError, match=r"cannot connect to https://huggingface.co \(no network\?\)"):
        hub.from_pretrained(loader, "org/model", "LLM", "model.llm.pretrained")
    assert calls == [{"local_files_only": True}]  # only the cache was tried: no download with its retries
