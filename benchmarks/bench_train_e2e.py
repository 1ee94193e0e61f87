"""The whole training pipeline, LLaVA JSON -> image decode -> tokens -> optimizer step: mmkit vs TRL side by side.

One tiny llava-hf model (CLIP + Llama, written once by transformers' ``save_pretrained``) and one generated
LLaVA-shaped dataset feed every side; each side trains the same N optimizer steps of the same global batch in
its own subprocess, sides interleaved over the rounds:

  (a) ``landed``:  mmkit as landed before this round of work (``python -m mmkit.train`` of an older checkout,
                   ``--landed``; it loads its data in the training process);
  (b) ``workers``: mmkit now, ``data.num_workers`` DataLoader workers;
  (c) ``packed``:  mmkit now, workers + ``data.packing: true``;
  (d) ``trl``:     TRL's ``SFTTrainer`` on ``LlavaForConditionalGeneration`` with its vision-language collator.

Same initial weights on every side: mmkit's recipes read the vision tower and the LLM from parts split out of
the llava-hf directory (``pretrained:`` paths; a recipe has no key for whole-model weights) and initialise the
connector from ``train.seed``; the benchmark builds that connector first, with the same seed, and writes it
into the llava-hf directory before TRL reads it. Same sample order: mmkit's order for one process is
``torch.randperm(samples, generator=torch.Generator().manual_seed(train.seed))``; TRL gets its dataset in that
order with ``train_sampling_strategy="sequential"``. Same supervised tokens: TRL's processor carries a Jinja
chat template that renders mmkit's ``vicuna_v1`` prompt exactly, with ``{% generation %}`` around each answer
and its ``</s>``, and ``assistant_only_loss=True``; the benchmark checks ids, labels and pixels on the
trained samples before it times anything. Same images: mmkit's ``pad`` + ``fast`` backend against
transformers' ``LlavaImageProcessor(do_pad=True)``.

Data mix (``--samples`` records, seeded; shares of LLaVA-665k's kinds, lengths in words):

  * 40% short VQA: 1-4 exchanges of a 5-12-word question + "Answer the question using a single word or
    phrase." and a 1-3-word answer (VQAv2 / GQA / OCR-VQA style);
  * 30% conversations: 3-8 exchanges, 6-16-word questions, 10-45-word answers (LLaVA-Instruct conversations);
  * 25% long descriptions: one 8-14-word request and a 60-160-word answer (detail / complex reasoning);
  * 5% text-only: 1-3 exchanges, 8-20-word prompts, 30-100-word answers, no image (ShareGPT).

Images: one JPEG per image record, sides 200-640 px, aspect ratios ~1:3 to 3:1, shapes drawn over a
gradient with noise (so that the files do not compress to almost nothing). Words come from ~3000 made-up words
(Zipf-distributed); the tokenizer is a SentencePiece BPE (byte fallback, Llama's special tokens, vocabulary 4000
+ <image>) trained here on the generated text, offline.

Model: CLIP ViT 4 x 256 at 224 px with 28 px patches (64 image tokens), mlp2x_gelu, Llama 4 x 256, fp32; LLaVA's
fine-tune stage (vision frozen; connector and LLM trained), AdamW, cosine without warmup, grad-norm clip 1.

TRL's settings (TRL 1.16 as installed; ``SFTConfig`` / ``SFTTrainer.__init__``): ``remove_unused_columns=False``
and ``dataset_kwargs={"skip_prepare_dataset": True}`` (the vision collator tokenizes and decodes on the fly),
``max_length=None`` (truncation could cut image tokens; no sample here is near ``--max-length``),
``assistant_only_loss=True``, ``dataloader_num_workers`` = mmkit's workers, ``bf16=False`` / ``use_cpu=True``
(fp32 on CPU, as mmkit), ``gradient_checkpointing=False`` (SFTConfig defaults to True; mmkit's recipe leaves it
off; side ``trl-gc`` runs TRL's default). ``padding_free`` and ``packing`` are not used: SFTConfig documents
``padding_free`` for FlashAttention 2/3 only, and SFTTrainer raises a ValueError for either with a vision
dataset (the benchmark asks it and prints the answer).

Timing: the parent stamps each optimizer step when its line lands in the side's per-step metrics file (mmkit's
``metrics.jsonl``; a TRL ``on_step_end`` callback); samples/s and supervised tokens/s are over steps
``--warmup``+1 .. N (the first steps start the workers and fill the prefetch queue), from their span and from
their median step time; ``wall`` is the subprocess from start to exit (imports, loading, the final save).
Each training process runs ``--threads`` torch threads (default 1, see ``--help``). Memory: the largest
single-process peak RSS of the tree (``wait4``: the kernel's high-water mark), and from a sampler thread reading
/proc of the trainer and its DataLoader workers, the tree's summed PSS (shared pages counted once; every second:
reading it walks the page tables) and summed RSS (every 20 ms).

    python benchmarks/bench_train_e2e.py [--steps 8] [--samples N] [--rounds 2] [--sides ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, print_table  # noqa: E402

SIDES = ("landed", "workers", "packed", "trl")
EXTRA_SIDES = ("trl-gc",)  # TRL with its default gradient checkpointing, on request (--sides)
IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
VQA_SUFFIX = "Answer the question using a single word or phrase."
MIX = (("vqa", 0.40), ("conversation", 0.30), ("description", 0.25), ("text", 0.05))

# mmkit's vicuna_v1 ("{system} USER: {q} ASSISTANT: {a}</s>USER: ..."), images first in the first user turn as
# LLaVA writes them ("<image>\n{q}"); {% generation %} marks what mmkit supervises: each answer and its </s>.
# The two spaces give the ids of LLaVA's tokenization, which mmkit reproduces: a non-legacy Llama tokenizer adds
# no "▁" after a special token, so "<s>A" would start with "A" where LLaVA has "▁A" (its BOS is an id, not
# text), and "<image>\n" would give "\n" where LLaVA's tokenizer_image_token has "▁\n" (each text chunk after
# an image is tokenized as a new text, dummy prefix included)
VICUNA_CHAT_TEMPLATE = (
    "{{ bos_token }}{{ ' " + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image> \n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ ' ASSISTANT: ' }}"
    "{% else %}{% generation %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)


# ============================================================================ data


def _words(rng: random.Random, n: int = 3000) -> list[str]:
    onset = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr sh ch th".split()
    vowel = "a e i o u ai ea ou io".split()
    coda = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(onset) + rng.choice(vowel) + rng.choice(coda) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class _Text:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.vocab = _words(rng)
        self.weights = [1.0 / (k + 1) for k in range(len(self.vocab))]  # Zipf

    def sentence(self, lo: int, hi: int, end: str = ".") -> str:
        words = self.rng.choices(self.vocab, self.weights, k=self.rng.randint(lo, hi))
        text = []
        for i, w in enumerate(words):  # commas and sentence breaks every ~12 words, as prose has
            text.append(w.capitalize() if i == 0 or text[-1].endswith(".") else w)
            if i < len(words) - 1 and self.rng.random() < 1 / 12:
                text[-1] += self.rng.choice((",", "."))
        return " ".join(text) + end


def _exchanges(kind: str, t: _Text) -> list[tuple[str, str]]:
    r = t.rng
    if kind == "vqa":
        return [(t.sentence(5, 12, "?") + "\n" + VQA_SUFFIX, t.sentence(1, 3, "")) for _ in range(r.randint(1, 4))]
    if kind == "conversation":
        return [(t.sentence(6, 16, "?"), t.sentence(10, 45)) for _ in range(r.randint(3, 8))]
    if kind == "description":
        return [(t.sentence(8, 14, "."), t.sentence(60, 160))]
    return [(t.sentence(8, 20, "?"), t.sentence(30, 100)) for _ in range(r.randint(1, 3))]


def _image(rng: random.Random, path: Path) -> tuple[int, int]:
    import numpy as np
    from PIL import Image, ImageDraw

    ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    long_side = rng.randint(320, 640)
    w, h = (long_side, max(200, int(long_side / ratio))) if ratio >= 1 else (max(200, int(long_side * ratio)), long_side)
    g = np.random.default_rng(rng.getrandbits(32))
    base = np.linspace(g.uniform(0, 255, 3), g.uniform(0, 255, 3), w)[None, :, :].repeat(h, 0)
    base += g.normal(0, 18, (h, w, 3))
    img = Image.fromarray(base.clip(0, 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img.save(path, quality=90)
    return w, h


def write_dataset(root: Path, samples: int, seed: int = 0) -> dict:
    """``root/llava.json`` (LLaVA records) and ``root/images/*.jpg``; returns paths and the mix as written."""
    rng = random.Random(seed)
    t = _Text(rng)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    kinds = rng.choices([k for k, _ in MIX], [w for _, w in MIX], k=samples)
    records, sizes = [], []
    for i, kind in enumerate(kinds):
        conv = []
        for j, (q, a) in enumerate(_exchanges(kind, t)):
            if j == 0 and kind != "text":
                q = IMAGE_TOKEN + "\n" + q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec = {"id": f"{kind}-{i}", "conversations": conv}
        if kind != "text":
            rec["image"] = f"{i:06d}.jpg"
            sizes.append(_image(rng, images / rec["image"]))
        records.append(rec)
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    mix = {k: kinds.count(k) for k, _ in MIX}
    words = {k: [sum(len(m["value"].split()) for m in r["conversations"]) for r in records if r["id"].startswith(k)]
             for k, _ in MIX}
    return {"json": str(path), "images": str(images), "records": records, "mix": mix,
            "words": {k: (min(v), round(statistics.mean(v)), max(v)) if v else None for k, v in words.items()},
            "image_sizes": (min(min(s) for s in sizes), max(max(s) for s in sizes)) if sizes else None}


def corpus(records: list[dict]) -> list[str]:
    lines = [VICUNA_SYSTEM, "USER: ASSISTANT:", VQA_SUFFIX]
    for r in records:
        lines += [m["value"].replace(IMAGE_TOKEN, "") for m in r["conversations"]]
    return lines


# ============================================================================ tokenizer and model


def train_tokenizer(lines: list[str], out: Path, vocab: int = 4000):
    """A Llama-style SentencePiece BPE (byte fallback, <unk> <s> </s>) trained offline, plus <image>; pad = <unk>
    (LLaVA's Vicuna convention)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
        num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {p: sp.get_score(i) for p, i in pieces.items()}
    tok = LlamaTokenizer(vocab=pieces, merges=generate_merges(pieces, scores), legacy=False, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.pad_token = tok.unk_token
    tok.save_pretrained(out)
    return tok


def model_configs(tok, image_size: int = 224, patch: int = 28):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=2048,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", multimodal_projector_bias=True)


def recipe(parts: Path, data: dict, run_dir: Path, args, *, landed: bool, workers: int = 0,
           packing: bool = False) -> dict:
    """The recipe of one mmkit side: parts from ``parts``, the stage LLaVA's fine-tune runs (vision frozen)."""
    data_cfg = {"sources": [{"path": data["json"], "image_folder": data["images"]}]}
    if not landed:  # keys the landed version does not read (it has no DataLoader)
        data_cfg.update(num_workers=workers, packing=packing)
    return {
        "name": "bench-train-e2e",
        "model": {
            "vision": {"name": "clip", "pretrained": str(parts / "vision"), "feature_layer": -2, "select": "patch"},
            "connector": {"name": "mlp2x_gelu"},
            "llm": {"name": "llama", "pretrained": str(parts / "llm")},
            "image": {"aspect_ratio": "pad", "backend": "fast"},
            "template": "vicuna_v1",
            "max_length": args.max_length,
            "dtype": "float32",
        },
        "data": data_cfg,
        "stages": [{
            "name": "finetune",
            "trainable": {"vision": "frozen", "connector": "full", "llm": "full"},
            "lr": {"connector": args.lr, "llm": args.lr},
            "max_steps": args.steps,
            "global_batch_size": args.global_batch,
            "per_device_batch_size": args.batch,
            "warmup_ratio": 0.0,  # mmkit's warmup starts at lr/warmup, transformers' at 0: none on either side
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        }],
        "train": {"output_dir": str(run_dir), "seed": args.seed, "save_every": 0, "keep_last": 1,
                  "log_every": max(1, args.steps)},
    }


def build_model(root: Path, tok, args) -> dict:
    """The llava-hf directory every side starts from (transformers' save_pretrained), and its parts for mmkit's
    recipes. The connector is the one mmkit's recipe initialises from ``train.seed``, copied into the llava-hf
    model so that TRL starts from the same weights."""
    import torch
    import yaml
    from transformers import (
        CLIPVisionModel,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    import mmkit

    torch.manual_seed(args.seed + 1)
    cfg = model_configs(tok)
    llava = LlavaForConditionalGeneration(cfg).eval()
    parts = root / "parts"
    vision = CLIPVisionModel(cfg.vision_config)
    vision.load_state_dict(llava.model.vision_tower.state_dict())
    vision.save_pretrained(parts / "vision")
    llm = LlamaForCausalLM(cfg.text_config)
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    llm.save_pretrained(parts / "llm")
    tok.save_pretrained(parts / "llm")

    # what `python -m mmkit.train` builds from the recipe: torch.manual_seed(train.seed), then mmkit.build
    rec = root / "connector-init.yaml"
    rec.write_text(yaml.safe_dump(recipe(parts, {"json": "x.json", "images": "."}, root / "connector-init", args,
                                         landed=False)))
    torch.manual_seed(args.seed)
    built = mmkit.build(str(rec))
    proj = llava.model.multi_modal_projector
    with torch.no_grad():
        proj.linear_1.weight.copy_(built.connector.proj[0].weight)
        proj.linear_1.bias.copy_(built.connector.proj[0].bias)
        proj.linear_2.weight.copy_(built.connector.proj[2].weight)
        proj.linear_2.bias.copy_(built.connector.proj[2].bias)
    hf_dir = root / "llava-hf"
    llava.save_pretrained(hf_dir)
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": cfg.vision_config.image_size},
        crop_size={"height": cfg.vision_config.image_size, "width": cfg.vision_config.image_size}, do_pad=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VICUNA_CHAT_TEMPLATE)
    processor.save_pretrained(hf_dir)
    n_params = sum(p.numel() for p in llava.parameters())
    n_trainable = n_params - sum(p.numel() for p in llava.model.vision_tower.parameters())
    return {"hf_dir": hf_dir, "parts": parts, "params": n_params, "trainable": n_trainable, "mmkit_model": built,
            "processor": processor}


def sample_order(n: int, seed: int) -> list[int]:
    """mmkit's training order for one process without length grouping (mmkit.data.sampler.StepBatchSampler)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def trl_example(record: dict, image_folder: str, load_images: bool = False) -> dict:
    """A LLaVA record in TRL's conversational vision format: roles user / assistant, the images in ``images``
    (TRL's collator puts them before the first user text, where LLaVA's ``<image>\\n`` was)."""
    messages = [{"role": "user" if m["from"] == "human" else "assistant",
                 "content": m["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")}
                for m in record["conversations"]]
    images = [str(Path(image_folder) / record["image"])] if "image" in record else []
    if load_images:
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in images]
    return {"images": images, "messages": messages}


def trl_features():
    """The dataset columns TRL's vision collator reads: ``images`` (decoded when a row is read, so in the
    DataLoader worker) and ``messages``."""
    import datasets

    return datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    })


def check_inputs(data: dict, built, processor, indices: list[int], max_length: int) -> dict:
    """Token ids, labels and pixels of mmkit now and of TRL's collator, sample by sample, on ``indices``; the
    supervised tokens (next-token labels) of each sample per side."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from mmkit.data.dataset import LlavaDataset

    ds = LlavaDataset(data["json"], data["images"], built.processor, "vicuna_v1", max_length=max_length)
    collate = DataCollatorForVisionLanguageModeling(processor, max_length=None, assistant_only_loss=True)
    same_ids = same_labels = 0
    pixel_diff = 0.0
    sup = {"mmkit": {}, "trl": {}}
    lengths = {}
    for i in indices:
        s = ds[i]
        o = collate([trl_example(data["records"][i], data["images"], load_images=True)])
        a_ids, b_ids = torch.as_tensor(s["input_ids"]).tolist(), o["input_ids"][0].tolist()
        a_lab, b_lab = torch.as_tensor(s["labels"]).tolist(), o["labels"][0].tolist()
        same_ids += a_ids == b_ids
        same_labels += a_lab == b_lab
        sup["mmkit"][i] = sum(x != -100 for x in a_lab[1:])
        sup["trl"][i] = sum(x != -100 for x in b_lab[1:])
        lengths[i] = len(a_ids)
        if s.get("pixel_values") is not None and len(s["pixel_values"]) and "pixel_values" in o:
            pa = torch.stack(list(s["pixel_values"])) if isinstance(s["pixel_values"], list) else s["pixel_values"]
            pixel_diff = max(pixel_diff, float((pa.reshape(o["pixel_values"].shape) - o["pixel_values"]).abs().max()))
    return {"samples": len(indices), "same_ids": same_ids, "same_labels": same_labels, "pixel_max_abs_diff": pixel_diff,
            "supervised": sup, "lengths": lengths}


def probe_trl_refusals(hf_dir: Path, data: dict, out: Path) -> dict:
    """What TRL's SFTTrainer answers, here, to ``padding_free=True`` and to ``packing=True`` with this model and
    a vision dataset (its two padding-removal settings): the error, or "accepted"."""
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_list([trl_example(r, data["images"]) for r in data["records"][:4]],
                                         features=trl_features())
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    answers = {}
    for key in ("padding_free", "packing"):
        cfg = SFTConfig(output_dir=str(out / key), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                        max_length=None if key == "padding_free" else 1024, **{key: True})
        try:
            SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=processor)
            answers[key] = "accepted"
        except ValueError as exc:
            answers[key] = f"ValueError: {exc}"
    return answers


# ============================================================================ running one side


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kib(pid: int) -> int:
    """Resident set of one process in KiB (/proc/PID/statm: a counter, no page-table walk); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kib(pid: int) -> int:
    """Proportional set of one process in KiB: pages shared with its forked workers counted once over the tree.
    Reading it walks the page tables (~50 ms for 1 GiB), so it is sampled once a second only."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch(threading.Thread):
    """The time each new line of ``metrics`` (one line per optimizer step) first appears (polled every 5 ms);
    the process tree's summed RSS every 20 ms and summed PSS every second, peaks kept."""

    def __init__(self, pid: int, metrics: Path, rss_every: float = 0.02, pss_every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.metrics, self.rss_every, self.pss_every = pid, metrics, rss_every, pss_every
        self.peak_pss = self.peak_rss = 0
        self.max_procs = 0
        self.step_times: list[float] = []
        self.stop = threading.Event()

    def run(self):
        next_rss = next_pss = 0.0
        pids = [self.pid]
        while not self.stop.is_set():
            now = time.perf_counter()
            try:
                with open(self.metrics) as fh:
                    n = sum(1 for line in fh if line.strip())
            except OSError:
                n = 0
            self.step_times += [now] * (n - len(self.step_times))
            if now >= next_rss:
                pids = _tree(self.pid)
                self.max_procs = max(self.max_procs, len(pids))
                self.peak_rss = max(self.peak_rss, sum(_rss_kib(p) for p in pids))
                next_rss = now + self.rss_every
            if now >= next_pss:
                self.peak_pss = max(self.peak_pss, sum(_pss_kib(p) for p in pids))
                next_pss = now + self.pss_every
            time.sleep(0.005)


def run_side(side: str, cmd: list[str], env: dict, cwd: Path, metrics: Path, log: Path, timeout: float) -> dict:
    """Run one side's subprocess; its step times, memory and exit status."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = Watch(proc.pid, metrics)
        watch.start()
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)  # the last metrics line
        watch.stop.set()
        watch.join()
    return {"side": side, "rc": proc.returncode, "wall_s": wall, "step_times": [t - t0 for t in watch.step_times],
            "peak_pss_mib": watch.peak_pss / 1024, "peak_rss_sum_mib": watch.peak_rss / 1024,
            "max_rss_one_process_mib": usage.ru_maxrss / 1024, "processes": watch.max_procs, "log": str(log)}


def mmkit_losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ============================================================================ TRL side (a child process)


def trl_child(cfg: dict) -> int:
    """Train with TRL's SFTTrainer as its documentation sets it up for a vision-language model; one line per
    optimizer step to ``metrics`` (on_step_end) and the logged losses to ``losses``."""
    import datasets
    import torch
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

    records = json.loads(Path(cfg["json"]).read_text())
    rows = [trl_example(records[i], cfg["images"]) for i in sample_order(len(records), cfg["seed"])]
    dataset = datasets.Dataset.from_list(rows, features=trl_features())

    model = LlavaForConditionalGeneration.from_pretrained(cfg["hf_dir"], dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)  # LLaVA's fine-tune stage, as the mmkit recipes train
    processor = AutoProcessor.from_pretrained(cfg["hf_dir"])
    metrics, losses = Path(cfg["metrics"]), Path(cfg["losses"])

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with open(metrics, "a") as fh:
                fh.write(json.dumps({"step": state.global_step}) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                with open(losses, "a") as fh:
                    fh.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    workers = cfg["workers"]
    args = SFTConfig(
        output_dir=cfg["run_dir"],
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=cfg["global_batch"] // cfg["batch"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=cfg["seed"],
        # the vision-language settings TRL documents: the collator tokenizes and decodes on the fly, so the
        # dataset keeps its raw columns and is not prepared; no truncation (it would cut image tokens)
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        assistant_only_loss=True,  # the answers and their </s>, as mmkit's labels (the chat template marks them)
        packing=False,  # TRL raises for vision datasets with packing or padding_free
        padding_free=False,
        train_sampling_strategy="sequential",  # the dataset is already in mmkit's order
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=2 if workers else None,
        dataloader_pin_memory=False,
        bf16=False,  # fp32 on CPU, as the mmkit sides
        use_cpu=True,
        # SFTConfig's default is True; mmkit's recipes leave it off, so the "trl" side does too ("trl-gc": on)
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         callbacks=[Stamp()])
    trainer.train()
    return 0


# ============================================================================ the benchmark


def side_command(side: str, root: Path, run_dir: Path, ctx: dict, args) -> tuple[list[str], dict, Path]:
    """(command, environment, metrics file) of one run of ``side``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf-datasets-cache")}
    if args.threads:  # torch's intra-op threads of the training process (DataLoader workers use 1 anyway)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run_dir.mkdir(parents=True)
    if side.startswith("trl"):
        cfg = {"gradient_checkpointing": side == "trl-gc", "json": ctx["data"]["json"], "images": ctx["data"]["images"], "hf_dir": str(ctx["hf_dir"]),
               "run_dir": str(run_dir), "metrics": str(run_dir / "steps.jsonl"), "losses": str(run_dir / "losses.jsonl"),
               "seed": args.seed, "steps": args.steps, "batch": args.batch, "global_batch": args.global_batch,
               "lr": args.lr, "workers": args.workers}
        (run_dir / "trl.json").write_text(json.dumps(cfg))
        return [sys.executable, str(Path(__file__).resolve()), "--child-trl", str(run_dir / "trl.json")], env, \
            run_dir / "steps.jsonl"
    import yaml

    landed = side == "landed"
    rec = recipe(ctx["parts"], ctx["data"], run_dir, args, landed=landed, workers=args.workers,
                 packing=side == "packed")
    path = run_dir / "recipe-in.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    if landed:
        src = Path(args.landed).resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "kernels")])
    return [sys.executable, "-m", "mmkit.train", str(path)], env, run_dir / "metrics.jsonl"


def mmkit_origin(env: dict | None, cwd: Path) -> str:
    """Where a subprocess with ``env`` imports mmkit from, and that checkout's commit (find_spec: nothing runs)."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('mmkit').origin)"],
                         env=env, cwd=cwd, capture_output=True, text=True, check=False)
    origin = out.stdout.strip() or f"not importable ({out.stderr.strip()[-200:]})"
    if out.returncode == 0:
        sha = subprocess.run(["git", "-C", str(Path(origin).parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.strip()
        origin += f" (commit {sha or 'unknown'})"
    return origin


def summarize(run: dict, order: list[int], sup: dict, args) -> dict:
    """samples/s and supervised tokens/s over steps warmup+1 .. N of one run: from the span of those steps, and
    (robust to another process stealing the CPU for a few seconds) from their median step time."""
    t, n, w, g = run["step_times"], args.steps, args.warmup, args.global_batch
    out = {"steps_done": len(t), "first_step_s": t[0] if t else None}
    if len(t) >= n > w:
        begin = t[w - 1] if w else 0.0
        span = t[n - 1] - begin
        durations = [b - a for a, b in zip([begin] + t[w:n - 1], t[w:n])]
        trained = order[w * g:n * g]
        tokens = sum(sup[i] for i in trained)
        out.update(timed_s=span, samples_s=(n - w) * g / span, sup_tokens_s=tokens / span,
                   step_s=durations, samples_s_median_step=g / statistics.median(durations),
                   sup_tokens_s_median_step=tokens / (n - w) / statistics.median(durations))
    return out


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per side (default 8)")
    ap.add_argument("--samples", type=int, default=None, help="records to generate (default: steps x global batch)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all sides (default 2)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="per-device micro-batch (accumulation = global / this)")
    ap.add_argument("--workers", type=int, default=1,
                    help="DataLoader workers of mmkit now and of TRL (default 1: mmkit's default on 2 CPUs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each training process (default 1: on a shared 2-core machine a 2-thread "
                         "process that loses a core to another job stalls at every OpenMP barrier, and the second "
                         "core is the DataLoader worker's); 0 = torch's default (all cores)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of samples/s (default 2)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated, run in this order each round: {','.join(SIDES)} (default), and "
                         "trl-gc: TRL with SFTConfig's default gradient_checkpointing=True")
    ap.add_argument("--landed", default="/work/landed",
                    help="checkout of the landed mmkit (commit 1f71bdc) for side 'landed'; skipped if missing")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per side run")
    ap.add_argument("--json", default=str(HERE / "results" / "train_e2e.json"))
    ap.add_argument("--keep", help="write the data, model and runs here and keep them (default: a temp dir)")
    ap.add_argument("--child-trl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_trl:
        return trl_child(json.loads(Path(args.child_trl).read_text()))

    sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES + EXTRA_SIDES]
    if bad:
        ap.error(f"--sides: unknown {bad}; choose from {','.join(SIDES + EXTRA_SIDES)}")
    if args.global_batch % args.batch:
        ap.error(f"--global-batch {args.global_batch} is not a multiple of --batch {args.batch}")
    needed = args.steps * args.global_batch
    samples = args.samples or needed
    if samples < needed:  # a second epoch has a new order in mmkit and the same one in TRL's sequential sampler
        ap.error(f"--samples {samples} is fewer than --steps x --global-batch = {needed} (one epoch at most)")
    if "landed" in sides and not (Path(args.landed) / "mmkit" / "train" / "__main__.py").is_file():
        print(f"side 'landed' skipped: no mmkit checkout at --landed {args.landed}")
        sides.remove("landed")

    info = machine_info()
    info["isa"] = info["cpu_isa"]
    print(f"cpu ISA: torch CPU capability {info['isa']['torch_cpu_capability']}; flags "
          f"{' '.join(info['isa']['flags']) or 'none of avx2/avx512/amx'}")
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    tmp = None
    if args.keep:
        root = Path(args.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_e2e_")
        root = Path(tmp.name)
    try:
        data = write_dataset(root / "data", samples, args.seed)
        tok = train_tokenizer(corpus(data["records"]), root / "tokenizer")
        built = build_model(root, tok, args)
        print(f"data: {samples} records: " + ", ".join(
            f"{k} {n} ({100 * n / samples:.0f}%, {data['words'][k][0]}-{data['words'][k][2]} words, mean "
            f"{data['words'][k][1]})" for k, n in data["mix"].items() if n) +
            f"; JPEG sides {data['image_sizes'][0]}-{data['image_sizes'][1]} px")
        cfg = model_configs(tok)
        v, t = cfg.vision_config, cfg.text_config
        print(f"model: {built['params'] / 1e6:.2f}M parameters ({built['trainable'] / 1e6:.2f}M trained: connector + "
              f"LLM; CLIP {v.num_hidden_layers} x {v.hidden_size} at {v.image_size} px, "
              f"{(v.image_size // v.patch_size) ** 2} tokens per image, frozen), Llama {t.num_hidden_layers} x "
              f"{t.hidden_size}, vocab {t.vocab_size}; fp32; {args.steps} steps x global batch {args.global_batch} = "
              f"{args.batch} per micro-batch x {args.global_batch // args.batch} accumulation; "
              f"DataLoader workers {args.workers}; torch threads {args.threads or 'all'}; lr {args.lr:g}, cosine, no warmup")
        order = sample_order(samples, args.seed)
        trained = order[:needed]
        check = check_inputs(data, built["mmkit_model"], built["processor"], trained, args.max_length)
        lengths = [check["lengths"][i] for i in trained]
        print(f"inputs, mmkit vs TRL on the {len(trained)} trained samples: token ids identical in "
              f"{check['same_ids']}, labels in {check['same_labels']}; pixels max |diff| "
              f"{check['pixel_max_abs_diff']:.3g}; sequence length {min(lengths)}-{max(lengths)} (mean "
              f"{statistics.mean(lengths):.0f}) tokens")
        del built["mmkit_model"]
        probe = probe_trl_refusals(built["hf_dir"], data, root / "probe-trl") \
            if any(s.startswith("trl") for s in sides) else {}
        for key, answer in probe.items():
            print(f"TRL {key}=True with this model and dataset: {answer}")
        ctx = {"data": data, "parts": built["parts"], "hf_dir": built["hf_dir"]}
        origins = {"now": mmkit_origin(None, root)}
        if "landed" in sides:
            src = Path(args.landed).resolve()
            origins["landed"] = mmkit_origin({**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{src / 'kernels'}"}, root)
        for k, v in origins.items():
            print(f"mmkit {k}: {v}")

        runs = []
        for r in range(args.rounds):
            for side in sides:  # interleaved: a, b, c, d, a, b, c, d
                run_dir = root / "runs" / f"{side}-{r}"
                cmd, env, metrics = side_command(side, root, run_dir, ctx, args)
                print(f"round {r + 1}/{args.rounds} {side}: ", end="", flush=True)
                run = run_side(side, cmd, env, root, metrics, run_dir / "output.log", args.timeout)
                sup = check["supervised"]["trl" if side.startswith("trl") else "mmkit"]
                run.update(summarize(run, order, sup, args), round=r)
                if side.startswith("trl"):
                    lpath = run_dir / "losses.jsonl"
                    run["losses"] = [json.loads(x)["loss"] for x in lpath.read_text().splitlines()] \
                        if lpath.exists() else []
                else:
                    run["losses"] = mmkit_losses(run_dir)
                runs.append(run)
                if run["rc"] != 0 or run["steps_done"] < args.steps:
                    tail = Path(run["log"]).read_text()[-3000:]
                    print(f"FAILED (exit {run['rc']}, {run['steps_done']} steps); log tail:\n{tail}")
                    continue
                print(f"{run['samples_s']:.2f} samples/s, wall {run['wall_s']:.1f}s, peak PSS "
                      f"{run['peak_pss_mib']:.0f} MiB, loss {run['losses'][-1]:.5f}", flush=True)
        load_end = os.getloadavg()
        result = report(sides, runs, args, info, data, check, samples, load_start, load_end,
                        time.perf_counter() - t_start, built, probe)
        result["mmkit"] = origins
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r["rc"] == 0 and r["steps_done"] >= args.steps for r in runs) else 1


LABELS = {"landed": "(a) mmkit landed", "workers": "(b) mmkit workers", "packed": "(c) mmkit workers+packing",
          "trl": "(d) TRL SFTTrainer", "trl-gc": "(d') TRL, gradient checkpointing"}


def report(sides, runs, args, info, data, check, samples, load_start, load_end, total_s, built, probe) -> dict:
    ok = {s: [r for r in runs if r["side"] == s and r["rc"] == 0 and r.get("samples_s")] for s in sides}
    keys = ("samples_s", "sup_tokens_s", "samples_s_median_step", "sup_tokens_s_median_step", "wall_s",
            "first_step_s", "max_rss_one_process_mib", "peak_pss_mib", "peak_rss_sum_mib")
    agg = {}
    for s in sides:
        if ok[s]:
            agg[s] = {k: statistics.median(r[k] for r in ok[s]) for k in keys}
            agg[s]["losses"] = ok[s][0]["losses"]
            agg[s]["losses_equal_across_rounds"] = all(r["losses"] == ok[s][0]["losses"] for r in ok[s])
    rows = []
    for s in sides:
        if s not in agg:
            rows.append([LABELS[s], "failed"] + ["-"] * 8)
            continue
        rs, a = ok[s], agg[s]
        rows.append([LABELS[s], _fmt([r["samples_s"] for r in rs], 2), _fmt([r["sup_tokens_s"] for r in rs], 0),
                     _fmt([r["samples_s_median_step"] for r in rs], 2), _fmt([r["wall_s"] for r in rs], 0),
                     f"{a['max_rss_one_process_mib']:.0f}", f"{a['peak_pss_mib']:.0f}", f"{a['peak_rss_sum_mib']:.0f}",
                     f"{a['losses'][0]:.5f}", f"{a['losses'][-1]:.5f}"])
    print(f"\n{args.steps} steps x {args.global_batch} samples per side, {args.rounds} interleaved round(s), median "
          f"[min-max] over rounds; samples/s and supervised tokens/s over steps {args.warmup + 1}-{args.steps} "
          "(from their span, and from their median step time); memory in MiB")
    print_table(["side", "samples/s", "sup. tok/s", "samples/s (median step)", "wall s", "peak RSS trainer",
                 "peak PSS tree", "peak RSS sum tree", "loss step 1", f"loss step {args.steps}"], rows)

    ratios = {}

    def ratio(name, num, den, key):
        if num in agg and den in agg:
            ratios[name] = agg[num][key] / agg[den][key]
            print(f"  {name}: {ratios[name]:.2f}x")

    print("ratios of the medians:")
    for num, den in (("packed", "trl"), ("packed", "landed"), ("workers", "trl"), ("workers", "landed"),
                     ("packed", "workers"), ("landed", "trl"), ("packed", "trl-gc")):
        ratio(f"{num} vs {den}, samples/s", num, den, "samples_s")
    for num, den in (("packed", "trl"), ("packed", "landed")):
        ratio(f"{num} vs {den}, samples/s from the median step", num, den, "samples_s_median_step")
    for num, den in (("packed", "trl"), ("workers", "trl"), ("landed", "trl"), ("packed", "trl-gc")):
        ratio(f"{num} vs {den}, peak RSS of the trainer process (below 1: less memory)", num, den,
              "max_rss_one_process_mib")
        ratio(f"{num} vs {den}, peak PSS of the process tree", num, den, "peak_pss_mib")

    losses = {}
    ref = agg.get("workers", {}).get("losses")
    for s in sides:
        if ref and s in agg and s != "workers" and len(agg[s]["losses"]) == len(ref):
            losses[f"{s} vs workers"] = max(abs(a - b) for a, b in zip(agg[s]["losses"], ref))
    if losses:
        print("losses, max |difference| over the steps: " + "; ".join(f"{k} {v:.2g}" for k, v in losses.items()))
    for s in sides:
        if s in agg and not agg[s]["losses_equal_across_rounds"]:
            print(f"  note: {s}'s losses differ between rounds")
    targets = {}
    if "packed vs trl, samples/s" in ratios:
        targets["packed >= 2x TRL samples/s"] = ratios["packed vs trl, samples/s"] >= 2
    if "packed vs landed, samples/s" in ratios:
        targets["packed >= 2x landed samples/s"] = ratios["packed vs landed, samples/s"] >= 2
    key = "packed vs trl, peak RSS of the trainer process (below 1: less memory)"
    if key in ratios:
        targets["packed peak memory <= TRL's"] = ratios[key] <= 1 and ratios["packed vs trl, peak PSS of the process tree"] <= 1
    for k, v in targets.items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")
    print(f"load average: start {', '.join(f'{x:.2f}' for x in load_start)}; end "
          f"{', '.join(f'{x:.2f}' for x in load_end)}; the benchmark took {total_s:.0f}s")
    return {
        "machine": info, "load_start": load_start, "load_end": load_end, "seconds": total_s,
        "settings": {k: v for k, v in vars(args).items() if k != "child_trl"}, "samples": samples,
        "data_mix": data["mix"], "words": data["words"], "image_sizes": data["image_sizes"],
        "params": built["params"], "trainable": built["trainable"], "trl_refuses": probe,
        "inputs_check": {k: v for k, v in check.items() if k not in ("supervised", "lengths")},
        "sides": agg, "ratios": ratios, "loss_max_abs_diff_vs_workers": losses, "targets": targets,
        "runs": [{k: v for k, v in r.items() if k != "log"} for r in runs],
    }


if __name__ == "__main__":
    sys.exit(main())
