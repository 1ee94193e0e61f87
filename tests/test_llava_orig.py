"""Original-LLaVA checkpoints load into mmkit with the original repo's logits (fp32, <= 1e-5).

The oracle is the ``llava-torch`` wheel (haotian-liu/LLaVA 1.2.2.post1, installed with ``--no-deps``; only
its pure-Python modules are used): tiny ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` models with a
tiny local CLIP tower, written with ``save_pretrained`` and read back with ``mmkit.load``. The orig model takes one
``-200`` per image; mmkit takes the processor's expanded ids (N copies of its ``<image>`` id): the sequences then
line up position by position, image positions included, and every logit is compared.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmkit
from mmkit.data.tokenizer import build_word_tokenizer
from mmkit.encoders.base import HubUnavailableError
from mmkit.formats.llava_orig import UnsupportedCheckpointError, load_llava_orig, load_projector

TOL = 1e-5
IMAGE_TOKEN_INDEX = -200
PROMPT = "USER: <image>\nwhat is in the picture ? ASSISTANT:"
TEXTS = ["what is in the picture ?", "describe both images .", "a red square and a blue circle"]
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # no <image>: as in Vicuna's tokenizer


def _llava():
    """The llava-torch modules, imported without running ``llava/__init__`` (whose bare ``except`` hides errors)."""
    if "llava" not in sys.modules:
        spec = importlib.util.find_spec("llava")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("the llava-torch oracle is not installed "
                        "(pip install --no-deps llava-torch==1.2.2.post1)")
        pkg = types.ModuleType("llava")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec  # importlib.util.find_spec("llava") keeps working for other tests
        sys.modules["llava"] = pkg
    from llava import mm_utils
    from llava.model.language_model import llava_llama, llava_mistral

    return types.SimpleNamespace(mm_utils=mm_utils, llama=llava_llama, mistral=llava_mistral)


@pytest.fixture(scope="module", autouse=True)
def _restore_llava_modules():
    """Leave sys.modules as found: other test modules import llava-torch their own way."""
    saved = {k: v for k, v in sys.modules.items() if k == "llava" or k.startswith("llava.")}
    yield
    for k in [k for k in sys.modules if k == "llava" or k.startswith("llava.")]:
        del sys.modules[k]
    sys.modules.update(saved)


# --------------------------------------------------------------------------- fixtures


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init leaves norms/biases at exactly 1/0: make every weight matter
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _tower(path, size):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(size)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=size, patch_size=14)
    model = CLIPVisionModel(cfg)
    _perturb(model, size)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    return path


def _pixel_processor(size):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TEXTS, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {28: _tower(root / "clip28", 28), 56: _tower(root / "clip56", 56)}


def _orig_model(kind, tower_dir, vocab, seed=0, load_tower=True, **mm):
    llava = _llava()
    if kind == "llama":
        cls, cfg_cls = llava.llama.LlavaLlamaForCausalLM, llava.llama.LlavaConfig
    else:
        cls, cfg_cls = llava.mistral.LlavaMistralForCausalLM, llava.mistral.LlavaMistralConfig
    cfg = cfg_cls(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  mm_vision_tower=str(tower_dir), mm_hidden_size=32, **mm)
    torch.manual_seed(seed)
    model = cls(cfg)
    if hasattr(model.get_model(), "image_newline"):  # orig allocates it with torch.empty
        model.get_model().image_newline.data = torch.randn(cfg.hidden_size) / cfg.hidden_size**0.5
    if load_tower:
        model.get_model().get_vision_tower().load_model()
    _perturb(model, seed + 1)
    return model.eval()


def _save(model, tok, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path


LLAVA15 = dict(mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               image_aspect_ratio="pad", mm_patch_merge_type="flat", tokenizer_model_max_length=2048)
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # llava-v1.6's list at tile 56, (w, h)
LLAVA16 = dict(mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def llava15(request, tok, towers, tmp_path_factory):
    ref = _orig_model(request.param, towers[28], len(tok), **LLAVA15)
    path = _save(ref, tok, tmp_path_factory.mktemp(f"llava15-{request.param}"))
    return ref, mmkit.load(path).eval(), path


@pytest.fixture(scope="module")
def llava16(tok, towers, tmp_path_factory):
    ref = _orig_model("llama", towers[56], len(tok), seed=3, **LLAVA16)
    path = _save(ref, tok, tmp_path_factory.mktemp("llava16"), max_shard_size="100KB")  # sharded safetensors
    return ref, mmkit.load(path).eval(), path


# --------------------------------------------------------------------------- helpers


def _expand(orig_ids, counts, image_id):
    out, k = [], 0
    for t in orig_ids:
        if t == IMAGE_TOKEN_INDEX:
            out += [image_id] * counts[k]
            k += 1
        else:
            out.append(t)
    assert k == len(counts)
    return out


def _diff(ref_logits, got_logits):
    vocab = ref_logits.shape[-1]
    assert got_logits.shape[:-1] == ref_logits.shape[:-1]
    return (got_logits[..., :vocab] - ref_logits).abs().max().item()


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _end_to_end(ref, ours, tok, prompt, images):
    """Orig pixels (its mm_utils, PIL processor) + -200 ids vs mmkit's processor; returns the max logit diff."""
    llava = _llava()
    size = ref.get_vision_tower().config.image_size
    ref_ids = llava.mm_utils.tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX)
    kwargs = {}
    if images:
        kwargs["images"] = llava.mm_utils.process_images(images, _pixel_processor(size), ref.config)
        kwargs["image_sizes"] = [im.size for im in images]  # orig: (W, H)
    inputs = ours.processor(images=images, text=[prompt])
    counts = [ours.processor.num_image_tokens((im.height, im.width)) for im in images]
    assert inputs["input_ids"][0].tolist() == _expand(ref_ids, counts, ours.image_token_id)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ref_ids]), **kwargs).logits
        got = ours(**inputs).logits
    return _diff(want, got)


# --------------------------------------------------------------------------- LLaVA-1.5 style (pad, flat, mlp2x_gelu)


def test_llava15_image_prompt_end_to_end(llava15, tok):
    ref, ours, _ = llava15
    assert _end_to_end(ref, ours, tok, PROMPT, [_image(40, 25)]) <= TOL


def test_llava15_two_images_in_one_prompt(llava15, tok):
    ref, ours, _ = llava15
    prompt = "USER: <image> <image>\ndescribe both images . ASSISTANT:"
    assert _end_to_end(ref, ours, tok, prompt, [_image(20, 33, 1), _image(50, 50, 2)]) <= TOL


def test_llava15_text_only(llava15, tok):
    ref, ours, _ = llava15
    ids = tok("USER: describe both images . ASSISTANT: a red square")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits
        got = ours(input_ids=torch.tensor([ids])).logits
    assert _diff(want, got) <= TOL


def test_llava15_recipe_and_image_token(llava15, tok):
    ref, ours, _ = llava15
    m = ours.recipe.model
    assert (m.connector.name, m.image.aspect_ratio, m.image.merge, m.image.convention) == \
        ("mlp2x_gelu", "pad", "flat", "orig")
    assert (m.vision.feature_layer, m.vision.select, m.max_length) == (-2, "patch", 2048)
    assert m.llm.name == ref.config.model_type.removeprefix("llava_")
    # the tokenizer had no <image>: it is added as id V and the embeddings grow by exactly that one row
    vocab = len(tok)
    assert ours.image_token_id == vocab == ours.tokenizer.convert_tokens_to_ids("<image>")
    emb, head = ours.llm.get_input_embeddings().weight, ours.llm.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == vocab + 1
    assert torch.equal(emb[:vocab], ref.get_model().embed_tokens.weight)
    # the new LM-head row is the mean row: its logit is the mean logit, never the greedy choice
    with torch.no_grad():
        logits = ours(input_ids=torch.tensor([[1, 5, 6, 7]])).logits[0]
    assert torch.allclose(logits[:, vocab], logits[:, :vocab].mean(-1), atol=1e-5)
    assert (logits.argmax(-1) != vocab).all()


def test_llava15_config_as_released(llava15, tok, tmp_path):
    """The field set of liuhaotian/llava-v1.5-7b's config.json (transformers 4.31 era, model_type 'llava')."""
    ref, _, path = llava15
    kind = ref.config.model_type.removeprefix("llava_")
    dst = shutil.copytree(path, tmp_path / "released")
    cfg = json.loads((dst / "config.json").read_text())
    for key in ("dtype", "rope_parameters", "tokenizer_model_max_length", "mm_patch_merge_type"):
        cfg.pop(key, None)
    cfg.update(_name_or_path="./checkpoints/vicuna-7b-v1-5", max_length=4096, rope_theta=10000.0,
               image_grid_pinpoints=None, mm_resampler_type=None, torch_dtype="float16", transformers_version="4.31.0",
               freeze_mm_mlp_adapter=False, tune_mm_mlp_adapter=False, use_mm_proj=True, mm_use_im_start_end=False,
               mm_use_im_patch_token=False, rope_scaling=None, pretraining_tp=1)
    if kind == "llama":
        cfg["model_type"] = "llava"  # older uploads; the architecture decides
    (dst / "config.json").write_text(json.dumps(cfg))
    ours = mmkit.load(dst).eval()
    assert ours.recipe.model.llm.name == kind and ours.dtype == torch.float32
    assert not any(k.startswith("mm_") for k in ours.recipe.model.llm.config)
    assert _end_to_end(ref, ours, tok, PROMPT, [_image(40, 25)]) <= TOL


def test_checkpoint_tower_weights_win_over_mm_vision_tower(llava15, towers):
    ref, ours, _ = llava15
    from transformers import CLIPVisionModel

    on_disk = CLIPVisionModel.from_pretrained(str(towers[28])).state_dict()
    in_ckpt = ref.get_vision_tower().vision_tower.state_dict()
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(on_disk[key], in_ckpt[key])  # _orig_model perturbed the tower after loading it
    assert torch.equal(ours.vision.tower.state_dict()[key], in_ckpt[key])


def test_greedy_generation_matches(llava15, tok):
    ref, ours, _ = llava15
    llava = _llava()
    img = _image(40, 25)
    ref_ids = llava.mm_utils.tokenizer_image_token(PROMPT, tok, IMAGE_TOKEN_INDEX)
    pixels = llava.mm_utils.process_images([img], _pixel_processor(28), ref.config)
    want = _orig_greedy(ref, ref_ids, pixels, 6)
    inputs = ours.processor(images=[img], text=[PROMPT])
    got = ours.generate(**inputs, max_new_tokens=6, ignore_eos=True)  # the new ids only
    assert got[0].tolist() == want


@torch.no_grad()
def _orig_greedy(ref, ids: list[int], pixels, n: int) -> list[int]:
    """Greedy decoding with the original model's own forward, the whole sequence recomputed at every step (the same
    tokens as its cached ``generate``). Its ``generate`` cannot run on transformers >= 5.24, which passes ``cache=``
    to a ``forward`` written before that argument existed."""
    seq, new = list(ids), []
    for _ in range(n):
        logits = ref(input_ids=torch.tensor([seq]), images=pixels, use_cache=False).logits
        new.append(int(logits[0, -1].argmax()))
        seq.append(new[-1])
    return new


# --------------------------------------------------------------------------- linear projector, 4.x-era .bin shards


@pytest.fixture(scope="module")
def linear_bin(tok, towers, tmp_path_factory):
    """No mm_projector_type (= linear), square images, cls_patch, layer -1; saved as 4.x-era pytorch_model-*.bin
    shards whose tower keys carry ``vision_model.``."""
    ref = _orig_model("llama", towers[28], len(tok), seed=5, mm_vision_select_layer=-1,
                      mm_vision_select_feature="cls_patch", image_aspect_ratio="square")
    path = _save(ref, tok, tmp_path_factory.mktemp("linear"))
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("mm_projector_type", None)
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    tensors = {k.replace("model.vision_tower.vision_tower.", "model.vision_tower.vision_tower.vision_model."): v
               for k, v in tensors.items()}
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder") for k in tensors)
    assert "model.mm_projector.weight" in tensors
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: tensors[k] for k in ks}, path / name)
        weight_map.update({k: name for k in ks})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ref, path


def test_linear_projector_from_bin_shards_with_weights_only(linear_bin, tok, monkeypatch):
    ref, path = linear_bin
    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {kwargs}"
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    ours = mmkit.load(path).eval()
    monkeypatch.undo()
    assert len(calls) == 2
    assert ours.recipe.model.connector.name == "linear"
    assert (ours.vision.select, ours.vision.feature_layer) == ("cls_patch", -1)
    assert _end_to_end(ref, ours, tok, PROMPT, [_image(30, 45, 7)]) <= TOL


# --------------------------------------------------------------------------- LLaVA-1.6 style (anyres, spatial_unpad)


# (W, H): a small image (all candidates tie: orig takes the first pair as (w, h) -> 1 wide x 2 tall, HF would go
# 2 wide x 1 tall), a size where orig's int() and HF's round() unpad differently, and two ordinary ones.
NEXT_SIZES = [(25, 20), (188, 47), (150, 100), (60, 150)]


@pytest.mark.parametrize("size", NEXT_SIZES, ids=[f"{w}x{h}" for w, h in NEXT_SIZES])
def test_llava16_anyres_spatial_unpad(llava16, tok, size):
    from mmkit.processing.anyres import anyres_layout
    from mmkit.processing.spec import AnyResSpec

    ref, ours, _ = llava16
    img = _image(*size, seed=size[0])
    assert _end_to_end(ref, ours, tok, PROMPT, [img]) <= TOL
    hw = (img.height, img.width)
    orig, hf = (anyres_layout(hw, AnyResSpec.create(56, "anyres", PINPOINTS, c), 4) for c in ("orig", "hf"))
    if size == (25, 20):  # the test really covers the orig-vs-hf tie-break and unpad-rounding divergences
        assert orig.grid == (2, 1) and hf.grid == (1, 2)
    if size == (188, 47):
        assert orig.grid == hf.grid and orig.unpadded_hw != hf.unpadded_hw


def test_llava16_recipe(llava16):
    ref, ours, path = llava16
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    img = ours.recipe.model.image
    assert (img.aspect_ratio, img.merge, img.convention) == ("anyres", "spatial_unpad", "orig")
    assert img.grid_pinpoints == PINPOINTS  # kept as stored: (w, h) pairs, read as such under convention 'orig'
    assert torch.equal(ours.image_newline, ref.get_model().image_newline)


def test_llava16_two_images_of_different_sizes(llava16, tok):
    ref, ours, _ = llava16
    prompt = "USER: <image> <image>\ndescribe both images . ASSISTANT:"
    assert _end_to_end(ref, ours, tok, prompt, [_image(25, 20, 1), _image(150, 100, 2)]) <= TOL


def test_onevision_pinpoint_string_and_anyres_max(llava16, tmp_path):
    _, _, path = llava16
    dst = shutil.copytree(path, tmp_path / "ov")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(image_grid_pinpoints="(1x1),...,(2x3)", image_aspect_ratio="anyres_max_9")
    (dst / "config.json").write_text(json.dumps(cfg))
    img = mmkit.load(dst).recipe.model.image
    assert img.grid_pinpoints == [[56, 56], [56, 112], [56, 168], [112, 56], [112, 112], [112, 168]]
    assert (img.aspect_ratio, img.anyres_max, img.convention) == ("anyres", 9, "orig")


# --------------------------------------------------------------------------- stage-1 projector


def test_load_projector_bin(llava15, tmp_path):
    ref, _, path = llava15
    ours = mmkit.load(path).eval()
    g = torch.Generator().manual_seed(11)
    proj = {f"model.mm_projector.{k}": torch.randn(v.shape, generator=g) * 0.1
            for k, v in ref.get_model().mm_projector.state_dict().items()}
    torch.save(proj, tmp_path / "mm_projector.bin")
    load_projector(ours, tmp_path)  # a directory holding mm_projector.bin, as stage 1 writes it
    for key, value in proj.items():
        assert torch.equal(ours.connector.state_dict()["proj." + key.split("mm_projector.")[1]], value)
    ref = copy.deepcopy(ref)
    ref.get_model().mm_projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in proj.items()})
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7]
    pixels = torch.randn(1, 3, 28, 28)
    n = ours.vision.num_tokens
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), images=pixels).logits
        got = ours(input_ids=torch.tensor([_expand(ids, [n], ours.image_token_id)]), pixel_values=pixels).logits
    assert _diff(want, got) <= TOL


def test_load_projector_mismatch_is_a_clear_error(llava15, tmp_path):
    _, _, path = llava15
    ours = mmkit.load(path)
    torch.save({"model.mm_projector.weight": torch.zeros(48, 32), "model.mm_projector.bias": torch.zeros(48)},
               tmp_path / "mm_projector.bin")
    with pytest.raises(UnsupportedCheckpointError, match="mlp2x_gelu connector: missing"):
        load_projector(ours, tmp_path / "mm_projector.bin")


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora(tok, towers, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    # as orig train.py: LoRA is injected before the vision tower exists, so it only reaches the LLM
    orig = _orig_model("llama", towers[28], len(tok), seed=7, load_tower=False, **LLAVA15)
    llm_keys = {k: v for k, v in orig.state_dict().items() if "mm_projector" not in k}
    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in orig.config.to_dict().items()
                                           if not k.startswith("mm_") and k not in ("architectures", "model_type")}))
    base.load_state_dict(llm_keys)
    _save(base, tok, root / "vicuna")  # the base is a plain LLM, as lmsys/vicuna-7b-v1.5 is
    lora_dir = root / "llava-lora"
    peft_model = get_peft_model(orig, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(lora_dir)
    orig.config.save_pretrained(lora_dir)
    trainables = {f"base_model.model.model.mm_projector.{k}": v.clone()
                  for k, v in orig.get_model().mm_projector.state_dict().items()}
    torch.save(trainables, lora_dir / "non_lora_trainables.bin")
    adapter_cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(root / "vicuna")
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    orig.get_model().get_vision_tower().load_model()  # the orig builder loads the tower after the adapter
    return peft_model.eval(), lora_dir, root / "vicuna"


def test_lora_merge_matches_adapted_model(lora, tok):
    adapted, lora_dir, base_dir = lora
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    ours = mmkit.load(lora_dir).eval()
    assert not any("lora_" in n for n, _ in ours.named_parameters())  # merged into plain weights
    llava = _llava()
    img = _image(40, 25)
    ref_ids = llava.mm_utils.tokenizer_image_token(PROMPT, tok, IMAGE_TOKEN_INDEX)
    pixels = llava.mm_utils.process_images([img], _pixel_processor(28), adapted.base_model.model.config)
    inputs = ours.processor(images=[img], text=[PROMPT])
    with torch.no_grad():
        want = adapted(input_ids=torch.tensor([ref_ids]), images=pixels).logits
        got = ours(**inputs).logits
        no_lora = adapted.base_model.model  # sanity: the adapter really changes the logits
        with adapted.disable_adapter():
            plain = no_lora(input_ids=torch.tensor([ref_ids]), images=pixels).logits
    assert _diff(want, got) <= TOL
    assert (want - plain).abs().max().item() > 1e-3
    # base= overrides the adapter config's base_model_name_or_path
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "lmsys/not-downloaded-mmkit-test"
    (lora_dir / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        with pytest.raises(HubUnavailableError, match="lmsys/not-downloaded-mmkit-test.*base=DIR"):
            mmkit.load(lora_dir)
        again = load_llava_orig(lora_dir, base=base_dir).eval()
        with torch.no_grad():
            assert _diff(want, again(**inputs).logits) <= TOL
    finally:
        cfg["base_model_name_or_path"] = str(base_dir)
        (lora_dir / "adapter_config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- tower from mm_vision_tower, errors


def _copy_without_tower(src, dst):
    dst = shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.vision_tower.")},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _set_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_tower_from_mm_vision_tower_dir_and_missing_tower_error(tok, towers, tmp_path):
    ref = _orig_model("llama", towers[28], len(tok), seed=9, load_tower=True, **LLAVA15)
    # keep the tower as on disk (the orig loader reads it from mm_vision_tower)
    ref.get_vision_tower().vision_tower.load_state_dict(
        __import__("transformers").CLIPVisionModel.from_pretrained(str(towers[28])).state_dict())
    path = _copy_without_tower(_save(ref, tok, tmp_path / "full"), tmp_path / "no-tower")
    ours = mmkit.load(path).eval()
    assert ours.recipe.model.vision.pretrained == str(towers[28])
    assert _end_to_end(ref, ours, tok, PROMPT, [_image(33, 21)]) <= TOL

    _set_config(path, mm_vision_tower="openai/clip-vit-mmkit-test-not-downloaded")
    with pytest.raises(HubUnavailableError) as err:
        mmkit.load(path)
    msg = str(err.value)
    assert "openai/clip-vit-mmkit-test-not-downloaded" in msg and "vision_tower=DIR" in msg
    assert "not in the checkpoint" in msg
    # pointing at a local copy fixes it
    again = mmkit.load(path, vision_tower=towers[28]).eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 6]])
        assert torch.equal(again(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("field,value,match", [
    ("mm_projector_type", "qformer", r"mm_projector_type 'qformer' is not supported; supported: linear, identity, "
                                     r"mlp1x_gelu"),
    ("image_aspect_ratio", "crop_split", "image_aspect_ratio 'crop_split' is not supported"),
    ("mm_patch_merge_type", "maxpool2x2", "mm_patch_merge_type 'maxpool2x2' is not supported"),
    ("mm_vision_select_feature", "cls", "mm_vision_select_feature 'cls' is not supported"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end=true"),
    ("mm_new_magic", 1, r"unknown original-LLaVA config field\(s\) \['mm_new_magic'\]"),
    ("architectures", ["LlavaMptForCausalLM"], "unsupported original LLaVA model"),
])
def test_unsupported_fields_are_clear_errors(llava15, tmp_path, field, value, match):
    _, _, path = llava15
    dst = shutil.copytree(path, tmp_path / "x")
    _set_config(dst, **{field: value})
    if field == "architectures":
        _set_config(dst, model_type="llava_mpt")
    with pytest.raises(UnsupportedCheckpointError, match=match):
        mmkit.load(dst)


def test_stage1_dir_points_at_load_projector(llava15, tmp_path):
    _, _, path = llava15
    dst = tmp_path / "stage1"
    dst.mkdir()
    shutil.copy(path / "config.json", dst / "config.json")
    torch.save({"model.mm_projector.0.weight": torch.zeros(48, 32)}, dst / "mm_projector.bin")
    with pytest.raises(UnsupportedCheckpointError, match="load_projector"):
        mmkit.load(dst)


# --------------------------------------------------------------------------- no tokenizer, native round trip


def test_without_tokenizer_image_id_is_past_the_vocabulary(llava15, tmp_path):
    ref, _, path = llava15
    dst = tmp_path / "no-tok"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, dst / name)
    ours = mmkit.load(dst).eval()
    vocab = ref.config.vocab_size
    assert ours.tokenizer is None and ours.image_token_id == vocab
    assert ours.llm.get_input_embeddings().weight.shape[0] == vocab  # nothing grows
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7]
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), images=pixels).logits
        got = ours(input_ids=torch.tensor([_expand(ids, [ours.vision.num_tokens], vocab)]), pixel_values=pixels).logits
    assert _diff(want, got) <= TOL


def test_saved_as_mmkit_reloads_identically(llava16, tok, tmp_path):
    _, ours, _ = llava16
    ours.save(tmp_path / "mm")
    again = mmkit.load(tmp_path / "mm").eval()
    assert again.recipe.model.image.convention == "orig" and again.image_token_id == ours.image_token_id
    inputs = ours.processor(images=[_image(25, 20)], text=[PROMPT])
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, ours(**inputs).logits)


# --------------------------------------------------------------------------- Qwen2 + SigLIP (llava_qwen, OneVision-like)


def test_llava_qwen_siglip_as_llava_next_saves_it(tok, tmp_path):
    """llava_qwen / SigLIP come from LLaVA-NeXT, which llava-torch does not have: the LLM is checked against
    transformers' Qwen2 and the tower against the full SiglipVisionModel. LLaVA-NeXT drops the tower's last block
    and head before saving and uses the output of the remaining last block (= hidden_states[-2] of the full model).
    The vocabulary has spare rows (as Qwen2's 152064 > its tokenizer), so <image> fits without growing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, \
        SiglipVisionModel

    tower_dir = tmp_path / "siglip"
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=2, image_size=28, patch_size=14)).eval()
    _perturb(tower, 3)
    tower.save_pretrained(tower_dir)
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tower_dir)
    vocab = len(tok) + 8
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       rope_theta=1e6, tie_word_embeddings=False)).eval()
    _perturb(llm, 1)
    path = tmp_path / "ov"
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    tensors.update({"model.mm_projector.0.weight": torch.randn(48, 32, generator=g), "model.mm_projector.0.bias":
                    torch.randn(48, generator=g), "model.mm_projector.2.weight": torch.randn(48, 48, generator=g),
                    "model.mm_projector.2.bias": torch.randn(48, generator=g)})
    tensors.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()
                    if not k.startswith(("encoder.layers.2.", "head."))})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["LlavaQwenForCausalLM"], model_type="llava", mm_vision_tower=str(tower_dir),
               mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_patch_merge_type="flat",
               mm_spatial_pool_mode="bilinear", mm_newline_position="grid", mm_tunable_parts="mm_mlp_adapter")
    (path / "config.json").write_text(json.dumps(cfg))
    ours = mmkit.load(path).eval()
    assert (ours.recipe.model.llm.name, ours.llm.config.model_type, ours.template) == ("qwen2", "qwen2", "qwen_2")
    assert ours.image_token_id == len(tok) < vocab
    assert ours.llm.get_input_embeddings().weight.shape[0] == vocab
    assert ours.recipe.model.image.mean == [0.5, 0.5, 0.5]
    assert (ours.vision.config.num_hidden_layers, ours.vision.feature_layer) == (2, -1)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _diff(llm(input_ids=ids).logits, ours(input_ids=ids).logits) <= TOL
        want = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert (ours.vision(pixels) - want).abs().max().item() <= TOL
