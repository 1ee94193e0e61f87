"""Conversation tokenization: one batched tokenizer call per conversation vs one call per chunk, side by side.

    python benchmarks/bench_tokenize.py [--demo-images 1000] [--llava 1000] [--rounds 5] [--quick] [--json OUT]

The contenders are the two paths of ``mmkit.processing.text.tokenize_conversation``: the default (all chunks of a
conversation encoded in one call to the tokenizer's Rust backend, repeated chunks and SentencePiece words taken
from per-tokenizer caches) and ``reference=True`` (one tokenizer ``__call__`` per chunk, the code before).
Both give identical ids and labels; that is checked on every sample before timing.

Data sets:
  (a) the demo's stage-2 conversations (``mmkit.demo``, written into a temporary directory), encoded as the
      trainer does for ``recipes/tiny.yaml``'s instruct stage: the recipe's processor (word-level tokenizer,
      vicuna_v1, empty system prompt, max_length 256). Timed twice: the text part of ``encode_conversation``
      (``tokenize_conversation`` with the processor's image-token counts) and the whole
      ``encode_conversation`` with the images already decoded in memory (pixel preprocessing included).
  (b) LLaVA-665k-style conversations generated here (seeded): 45% short VQA (1-8 questions ending in "Answer
      the question using a single word or phrase.", 1-3 word answers), 30% multi-turn conversations of 3-10
      exchanges (5-20 word questions, 20-80 word answers), 20% detailed descriptions (one question, a 100-300
      word answer), 5% text-only (1-8 exchanges, 10-40 word questions, 50-300 word answers). Words come from a
      ~330-word vocabulary, 1% from a few non-ASCII ones and 3% from a long tail (random letter strings and
      numbers, as names and OCR'd text are) that the tokenizer was not trained on and no cache has seen.
      Each image is 576 tokens (LLaVA-1.5), max_length 2048, vicuna_v1 with its default system prompt.
      Tokenizer: a Llama-style SentencePiece BPE trained here (as tests/test_templates.py does) on the same
      generator's text without the long tail, plus the digits (byte fallback, <s> </s> <unk>, added <image>) in
      transformers' LlamaTokenizer, once legacy and once non-legacy.

Rounds interleave the two paths (alternating which goes first); the caches are emptied before every
default-path round, so every round sees the data as a first epoch does. Reported: samples/s by wall clock,
median [min, max]; the ratio of medians by wall clock and by process CPU time (steadier on a shared machine);
how many samples truncation shortened (whole trailing exchanges dropped) or refused ("too long"); and, from one
extra untimed pass with a counting wrapper around the tokenizer's backend (and mmkit's prefix-less copy of it),
tokenizer calls and encoded texts per sample. The environment's TOKENIZERS_PARALLELISM is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import sentencepiece as spm
from PIL import Image
from transformers import LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges

import mmkit.processing.processor as processor_module
from mmkit.builder import build
from mmkit.demo.options import ShapesDemoOptions, shapes_paths
from mmkit.processing.text import _tok_info, tokenize_conversation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- LLaVA-665k-style conversations
WORDS = """the a an of in on at with to and or but is are was were has have this that these those there here
man woman person people child dog cat horse bird car bus truck train bicycle motorcycle boat plane table chair
bed sofa window door wall floor street road sidewalk building house tree grass sky cloud water river lake sea
beach mountain field park food plate bowl cup bottle glass pizza sandwich cake banana apple orange phone laptop
keyboard screen book sign light pole fence umbrella bag hat shirt jacket shoe ball kite frisbee skateboard
surfboard snow rain sun shadow corner background foreground left right middle top bottom front side center
red blue green yellow white black brown gray orange pink purple large small big little tall short long wide
old young new wooden metal plastic bright dark colorful empty full busy quiet open closed wet dry sunny cloudy
standing sitting walking running riding holding carrying eating drinking looking playing wearing parked flying
swimming lying hanging reading talking waiting crossing smiling appears seems shows contains features includes
several many few two three four five some various other each both another together near next behind above
below under between across around through along inside outside while during because which who where when
scene image picture photo view area group pair number variety type style setting atmosphere activity moment
overall likely possibly clearly visible noticeable prominently slightly partially mostly also however""".split()
UNICODE = ["café", "naïve", "résumé", "Zürich", "São", "東京", "中文", "señor", "Ωmega", "€5"]
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
DETAIL_PROMPTS = ["Describe the following image.", "What do you see happening in this image?",
                  "Explain the visual content of the image in great detail.", "Describe the image in detail.",
                  "Can you elaborate on the elements of the picture provided?",
                  "What are the key elements in this picture?"]


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _rare(rng: np.random.Generator) -> str:
    """A word from the long tail (a name, a number, an OCR'd string): mostly never seen before."""
    if rng.random() < 0.3:
        return str(rng.integers(0, 100000)) if rng.random() < 0.7 else f"{rng.random() * 100:.1f}"
    return "".join(LETTERS[i] for i in rng.integers(0, 26, int(rng.integers(3, 10))))


def _words(rng: np.random.Generator, n: int, rare: float = 0.03) -> str:
    out = []
    for i in range(n):
        x = rng.random()
        w = _rare(rng) if x < rare else UNICODE[rng.integers(len(UNICODE))] if x < rare + 0.01 else WORDS[
            rng.integers(len(WORDS))]
        if i == 0 or out[-1].endswith("."):
            w = w[:1].upper() + w[1:]
        if i == n - 1 or rng.random() < 0.08:
            w += "."
        elif rng.random() < 0.06:
            w += ","
        out.append(w)
    return " ".join(out)


def _question(rng: np.random.Generator, n: int) -> str:
    return _words(rng, n).rstrip(".,") + "?"


def llava_conversation(rng: np.random.Generator) -> tuple[list[dict], int]:
    """One record's conversation and its number of images (0 or 1), in the LLaVA-665k proportions above."""
    kind = rng.random()
    turns: list[tuple[str, str]] = []
    if kind < 0.45:  # VQAv2 / GQA / OKVQA-style: several short questions about one image
        for _ in range(rng.integers(1, 9)):
            q = _question(rng, int(rng.integers(4, 10))) + SHORT_SUFFIX
            if rng.random() < 0.2:
                a = str(rng.integers(0, 10))
            elif rng.random() < 0.3:
                a = ["Yes", "No"][rng.integers(2)]
            else:
                a = _words(rng, int(rng.integers(1, 4))).rstrip(".")
            turns.append((q, a))
    elif kind < 0.75:  # LLaVA-Instruct conversations
        for _ in range(rng.integers(3, 11)):
            turns.append((_question(rng, int(rng.integers(5, 21))), _words(rng, int(rng.integers(20, 81)))))
    elif kind < 0.95:  # detailed descriptions
        turns.append((DETAIL_PROMPTS[rng.integers(len(DETAIL_PROMPTS))], _words(rng, int(rng.integers(100, 301)))))
    else:  # ShareGPT-style text-only, some longer than max_length
        for _ in range(rng.integers(1, 9)):
            turns.append((_question(rng, int(rng.integers(10, 41))), _words(rng, int(rng.integers(50, 301)))))
    has_image = kind < 0.95
    conv = []
    for i, (q, a) in enumerate(turns):
        if i == 0 and has_image:
            q = "<image>\n" + q if rng.random() < 0.5 else q + "\n<image>"  # both occur in 665k
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv, int(has_image)


def llama_sp_tokenizer(corpus: list[str], legacy: bool, vocab_size: int = 3000) -> LlamaTokenizer:
    """A Llama-style SentencePiece BPE trained on ``corpus`` (as tests/test_templates.py builds its tokenizers)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {p: sp.get_score(i) for p, i in vocab.items()}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


# ---------------------------------------------------------------------------- counting tokenizer calls
class _Counting:
    """Stands in for a ``tokenizers.Tokenizer`` and counts its encode calls and the texts they encode."""

    def __init__(self, inner, stats: dict):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_stats", stats)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name.startswith("encode") and callable(attr):
            def counted(first, *a, **kw):
                self._stats["calls"] += 1
                self._stats["texts"] += len(first) if name.startswith("encode_batch") else 1
                return attr(first, *a, **kw)
            return counted
        return attr

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


@contextlib.contextmanager
def counting(tok):
    """Count every call into ``tok``'s Rust backend (transformers' ``__call__`` makes one per call) and into
    mmkit's prefix-less copy of it."""
    stats = {"calls": 0, "texts": 0}
    info = _tok_info(tok)
    saved_backend, saved_cont = tok._tokenizer, info.cont
    tok._tokenizer = _Counting(saved_backend, stats)
    if saved_cont is not None:
        info.cont = _Counting(saved_cont, stats)
    try:
        yield stats
    finally:
        tok._tokenizer, info.cont = saved_backend, saved_cont


def clear_cache(tok) -> None:
    """Forget every remembered chunk and word (the next pass sees the data as a first epoch does)."""
    fast = _tok_info(tok).fast
    if fast is not None:
        fast.chunks.clear()
        if fast.words is not None:
            fast.words.cache.clear()


# ---------------------------------------------------------------------------- timing
class Skipped(str):
    """A sample the encoder refused (its message)."""


def _run_all(fn, samples):
    out = []
    for s in samples:
        try:
            out.append(fn(s))
        except ValueError as e:  # ConversationError("too long ...") is what a dataset counts and skips
            out.append(Skipped(e))
    return out


def each(fn):
    """A runner over all samples from a per-sample function."""
    return lambda samples: _run_all(fn, samples)


def _ids_labels(enc: dict):
    return enc["input_ids"], enc["labels"]


def _check(name: str, tok, samples: list, fast, ref, canon) -> list:
    """Both paths' results on ``samples`` (from empty caches); exit if they differ anywhere."""
    clear_cache(tok)
    got_fast = [x if isinstance(x, Skipped) else canon(x) for x in fast(samples)]
    got_ref = [x if isinstance(x, Skipped) else canon(x) for x in ref(samples)]
    if got_fast != got_ref:
        bad = next(i for i, (a, b) in enumerate(zip(got_fast, got_ref)) if a != b)
        raise SystemExit(f"{name}: sample {bad}: the default path differs from reference=True")
    return got_fast


def compare(name: str, tok, fast, ref, rounds: int, samples: list | None = None, fresh=None, canon=_ids_labels,
            truncated=None) -> dict:
    """Time the runners ``fast(samples)`` and ``ref(samples)``, interleaved, after checking equal results.

    ``samples``: every round runs them, the caches emptied before each default-path round (a first epoch over
    them). ``fresh(k)``: the k-th of rounds + 2 distinct sets (0 warms the caches up, 1 counts the calls, the
    others are timed, one each): the steady state of an epoch, where the common words are known and every
    conversation, with its long-tail words, is new.
    """
    sets = [samples] * (rounds + 2) if fresh is None else [fresh(k) for k in range(rounds + 2)]
    checked = [_check(name, tok, x, fast, ref, canon) for x in (sets[:1] if fresh is None else sets)]
    results = [x for c in checked for x in c]
    n = len(sets[2])
    clear_cache(tok)
    if fresh is not None:
        fast(sets[0])
    calls = {}
    for label, fn in (("default", fast), ("reference", ref)):
        if fresh is None:
            clear_cache(tok)
        with counting(tok) as stats:
            fn(sets[1])
        calls[label] = {k: v / len(sets[1]) for k, v in stats.items()}
    times = {"default": [], "reference": []}
    cpu = {"default": [], "reference": []}
    for r in range(rounds):
        order = [("default", fast), ("reference", ref)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            if fresh is None:
                clear_cache(tok)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(sets[2 + r])
            times[label].append(n / (time.perf_counter() - t0))
            cpu[label].append(n / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    lengths = [len(x[0]) for x in results if not isinstance(x, Skipped)]
    return {
        "name": name, "samples": n, "caches": "warm, fresh data" if fresh is not None else "emptied each round",
        "too_long": sum(isinstance(x, Skipped) for x in results) / len(results),
        "truncated": truncated(sets) if truncated else 0.0, "mean_tokens": statistics.mean(lengths),
        "samples_per_s": med, "range": {k: [min(v), max(v)] for k, v in times.items()},
        "ratio": med["default"] / med["reference"], "per_sample": calls,
        "samples_per_cpu_s": med_cpu, "ratio_cpu": med_cpu["default"] / med_cpu["reference"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-images", type=int, default=1000, help="demo training images (one conversation each)")
    ap.add_argument("--llava", type=int, default=1000, help="LLaVA-665k-style conversations")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="200 conversations each, 3 rounds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.demo_images, args.llava, args.rounds = 200, 200, 3
    info = machine_info()
    results = []

    # (a) the demo, through the recipe's processor
    with tempfile.TemporaryDirectory() as tmp:
        paths = shapes_paths(tmp, ShapesDemoOptions(train_images=args.demo_images, heldout_images=0))
        records = json.loads(paths.stage2.read_text())
        images = []
        for r in records:
            with Image.open(Path(paths.image_folder) / r["image"]) as im:
                images.append(im.convert("RGB"))
    proc = build(ROOT / "recipes" / "tiny.yaml").processor
    tok, template, max_length = proc.tokenizer, "vicuna_v1", proc.max_length
    counts = [proc.process_images([img])["num_tokens"] for img in images]
    texts = [(proc.with_system(r["conversations"]), c) for r, c in zip(records, counts)]

    def demo_text(reference):
        return lambda s: tokenize_conversation(tok, template, s[0], image_token=proc.image_token,
                                               image_token_id=proc.image_token_id, image_token_counts=s[1],
                                               max_length=max_length, reference=reference)

    results.append(compare("demo stage 2, text (tokenize_conversation)", tok, each(demo_text(False)),
                           each(demo_text(True)), args.rounds, samples=texts))

    reference_tokenize = mock.patch.object(  # encode_conversation with the per-chunk path
        processor_module, "tokenize_conversation", lambda *a, **kw: tokenize_conversation(*a, **kw, reference=True))

    def demo_full(s):
        return proc.encode_conversation(s[0], [s[1]], template, max_length)

    def demo_full_ref(samples):
        with reference_tokenize:
            return _run_all(demo_full, samples)

    def canon(enc):
        return enc["input_ids"], enc["labels"], [p.tolist() for p in enc["pixel_values"]], enc["image_sizes"]

    full = [(r["conversations"], img) for r, img in zip(records, images)]
    results.append(compare("demo stage 2, encode_conversation (+ 32 px images)", tok, each(demo_full),
                           demo_full_ref, args.rounds, samples=full, canon=canon))

    # (b) LLaVA-665k-style conversations, Llama-style SentencePiece, vicuna_v1
    def fresh(k):
        rng = np.random.default_rng([args.seed, k])
        return [llava_conversation(rng) for _ in range(args.llava)]

    corpus_rng = np.random.default_rng(args.seed + 1)
    corpus = [_words(corpus_rng, 40, rare=0) for _ in range(3000)] + [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: ASSISTANT:", "0 1 2 3 4 5 6 7 8 9"] * 20
    for legacy in (True, False):
        sp_tok = llama_sp_tokenizer(corpus, legacy)
        image_id = sp_tok.convert_tokens_to_ids("<image>")

        def llava_text(reference, sp_tok=sp_tok, image_id=image_id, max_length=2048):
            # the arguments encode_conversation passes (the processor knows the image token's id)
            return lambda s: tokenize_conversation(sp_tok, "vicuna_v1", s[0], image_token_id=image_id,
                                                   image_token_counts=[576] * s[1], max_length=max_length,
                                                   reference=reference)

        untruncated = llava_text(False, max_length=None)

        def truncated(sets, untruncated=untruncated):
            flat = [s for x in sets for s in x]
            return sum(len(untruncated(s)["input_ids"]) > 2048 for s in flat) / len(flat)

        flavour = "legacy" if legacy else "non-legacy"
        results.append(compare(f"LLaVA-665k-style, Llama SP ({flavour})", sp_tok, each(llava_text(False)),
                               each(llava_text(True)), args.rounds, fresh=fresh, truncated=truncated))

    rows = []
    for r in results:
        sps, rng_ = r["samples_per_s"], r["range"]
        rows.append([
            r["name"], r["caches"],
            f"{r['samples']} ({100 * r['truncated']:.1f}% truncated, {100 * r['too_long']:.1f}% too long), "
            f"{r['mean_tokens']:.0f} tok",
            f"{sps['reference']:.0f} [{rng_['reference'][0]:.0f}, {rng_['reference'][1]:.0f}]",
            f"{sps['default']:.0f} [{rng_['default'][0]:.0f}, {rng_['default'][1]:.0f}]",
            f"{r['ratio']:.2f}x", f"{r['ratio_cpu']:.2f}x",
            f"{r['per_sample']['reference']['calls']:.2f} / {r['per_sample']['default']['calls']:.2f}",
            f"{r['per_sample']['reference']['texts']:.1f} / {r['per_sample']['default']['texts']:.1f}",
        ])
    print(f"\nsamples/s (wall clock), median [min, max] of {args.rounds} interleaved rounds; ratio also by process "
          "CPU time (steadier on a shared machine); identical ids and labels checked on every sample; "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    print_table(["data", "caches", "samples per round", "reference=True", "default", "ratio (wall)", "ratio (CPU)",
                 "calls/sample ref / default", "texts encoded/sample ref / default"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
