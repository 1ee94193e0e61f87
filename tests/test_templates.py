"""Conversation templates and turn-by-turn label building (labels never come from re-tokenizing a rendered string).

Offline: three tiny tokenizers are trained here in well under a second --
  * a Llama-style SentencePiece BPE (sentencepiece trainer, byte fallback, <s> </s> <unk>, added
    <image>) wrapped in transformers' LlamaTokenizer, in both legacy and non-legacy flavour;
  * a Qwen-style byte-level BPE (<|endoftext|> <|im_start|> <|im_end|> <image>, no BOS);
  * a Llama-3-style byte-level BPE (<|begin_of_text|> added as BOS, header ids, <|eot_id|>).
Expected prompt strings are typed literally from haotian-liu/LLaVA's ``llava/conversation.py``. If the
original LLaVA wheel (llava-torch 1.2.2.post1) is found (env MMKIT_LLAVA_WHEEL or
/tmp/llava_whl/*.whl), its preprocess_v1/plain/llama_2 are used as an oracle for ids and labels.
"""

from __future__ import annotations

import copy
import glob
import io
import os
import sys
import types

import pytest

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaTokenizer, PreTrainedTokenizerFast  # noqa: E402
from transformers.tokenization_utils_base import generate_merges  # noqa: E402

from mmkit.processing.text import (  # noqa: E402
    ConversationError,
    build_inference_ids,
    tokenize_conversation,
)
from mmkit.registry import UnknownNameError, templates  # noqa: E402
from mmkit.templates import Template, get_template, render_prompt, stop_strings, stop_token_ids  # noqa: E402

IMG = "<image>"
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions.")
LLAMA3_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")

NAMED = ["plain", "vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct", "qwen_2", "llama_3"]
# what follows each supervised answer (the template's end-of-turn text)
EOT = {"plain": "\n", "vicuna_v1": "</s>", "llava_v1": "</s>", "mistral_instruct": " </s>",
       "chatml_direct": "<|im_end|>", "qwen_2": "<|im_end|>", "llama_3": "<|eot_id|>"}
SPACE_SEPARATED = {"vicuna_v1", "llava_v1", "mistral_instruct"}  # a " " between header and answer

# the trailing <image> moves to the front (preprocess_multimodal)
CONV3 = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "a cat"},
    {"from": "human", "value": "Describe it"},
    {"from": "gpt", "value": "a dog on the grass"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "Three red squares and a blue circle."},
]
ANSWERS3 = ["a cat", "a dog on the grass", "Three red squares and a blue circle."]
PLAIN_CONV = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "a red square"}]

CORPUS = [
    VICUNA_SYS, LLAVA_SYS, LLAMA3_SYS, "Answer the questions. You are a helpful assistant.",
    "USER: What is this? ASSISTANT: a cat", "Describe it. It is a dog on the grass.",
    "[INST] what colour is it [/INST] red </s>", "The quick brown fox jumps over the lazy dog.",
    "How many shapes are there? Three red squares and a blue circle.", "system user assistant",
] * 20

# ---------------------------------------------------------------------------- chat templates
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


# ---------------------------------------------------------------------------- tiny tokenizers
def _llama_sp(legacy: bool, corpus=CORPUS, **options):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=420, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
        **options,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {p: sp.get_score(i) for p, i in vocab.items()}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMG]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _byte_level(specials, bos=None, **kw):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, **kw)


@pytest.fixture(scope="module")
def toks():
    qwen = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG],
                       eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    llama3 = _byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>", IMG], bos="<|begin_of_text|>", eos_token="<|eot_id|>")
    llama3.chat_template = LLAMA3_CHAT_TEMPLATE
    return {"llama_legacy": _llama_sp(True), "llama": _llama_sp(False), "qwen": qwen, "llama3": llama3}


SP = ("llama_legacy", "llama")
TOKS = ("llama_legacy", "llama", "qwen", "llama3")


# ---------------------------------------------------------------------------- helpers
def spans(ids, labels):
    """Contiguous supervised id runs; also checks every label is -100 or its id."""
    assert len(ids) == len(labels)
    out, cur = [], []
    for i, lab in zip(ids, labels):
        assert lab in (-100, i)
        if lab != -100:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def runs_of(ids, value):
    """(start, length) of every run of ``value``."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == value:
            j = i
            while j < len(ids) and ids[j] == value:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def ref_image_token_ids(tok, prompt, counts, image_id):
    """The original ``tokenizer_image_token``, written from the spec, with expanded images:
    tokenize every chunk between <image> on its own; one BOS (if chunk 0 starts with it)."""
    # a prompt that writes its own BOS (llama_3) is tokenized without adding another one
    add = not (tok.bos_token and prompt.startswith(tok.bos_token))
    chunks = [tok(c, add_special_tokens=add)["input_ids"] for c in prompt.split(IMG)]
    offset = 1 if add and chunks[0][:1] == [tok.bos_token_id] and tok.bos_token_id is not None else 0
    ids = chunks[0][:1] if offset else []
    for k, c in enumerate(chunks):
        if k:
            ids += [image_id] * counts[k - 1]
        ids += c[offset:]
    return ids


def full_text(template, conv, tok=None):
    return render_prompt(template, conv, add_generation_prompt=False, tokenizer=tok)


# ============================================================================ registry + strings
def test_registry_names_and_aliases():
    for name in NAMED + ["tokenizer"]:
        assert isinstance(templates.get(name), Template) and templates.get(name).name == name
    for alias, name in [("v1", "vicuna_v1"), ("mistral_direct", "chatml_direct"), ("qwen_1_5", "qwen_2"),
                        ("llava_llama_3", "llama_3")]:
        assert templates.get(alias) is templates.get(name)
    with pytest.raises(UnknownNameError, match="vicuna_v1"):
        templates.get("vicuna_v2")


Q1 = [{"role": "user", "content": "<image>\nWhat is this?"}]
Q2 = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "cat"},
      {"role": "user", "content": "Describe it"}, {"role": "assistant", "content": "dog"}]

EXACT = [
    ("vicuna_v1", Q1, True, VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT:"),
    ("v1", Q2, False, VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT: cat</s>USER: Describe it ASSISTANT: dog</s>"),
    ("vicuna_v1", Q2[:3], True,
     VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT: cat</s>USER: Describe it ASSISTANT:"),
    ("llava_v1", Q1, True, LLAVA_SYS + " USER: <image>\nWhat is this? ASSISTANT:"),
    ("llava_v1", Q2, False, LLAVA_SYS + " USER: <image>\nWhat is this? ASSISTANT: cat</s>USER: Describe it ASSISTANT: dog</s>"),
    ("mistral_instruct", Q1, True, "[INST] <image>\nWhat is this? [/INST]"),
    ("mistral_instruct", Q2, False, "[INST] <image>\nWhat is this? [/INST] cat </s>[INST] Describe it [/INST] dog </s>"),
    ("mistral_instruct", [{"role": "system", "content": "Be brief."}] + Q1, True,
     "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is this? [/INST]"),
    ("chatml_direct", Q1, True,
     "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
     "<|im_start|>assistant\n"),
    ("mistral_direct", Q2, False,
     "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
     "<|im_start|>assistant\ncat<|im_end|><|im_start|>user\nDescribe it<|im_end|><|im_start|>assistant\ndog<|im_end|>"),
    ("qwen_2", Q1, True,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("qwen_1_5", Q2, False,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
     "<|im_start|>assistant\ncat<|im_end|>\n<|im_start|>user\nDescribe it<|im_end|>\n<|im_start|>assistant\ndog<|im_end|>\n"),
    ("llama_3", Q1, True,
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYS + "<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("llava_llama_3", [{"role": "system", "content": "S"}] + Q2, False,
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\ncat<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nDescribe it<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\ndog<|eot_id|>"),
    ("plain", Q1, True, "<image>"),
    ("plain", Q2[:2], False, "<image>cat\n"),
    # preprocess_multimodal: a trailing / inline <image> moves to the front
    ("vicuna_v1", [{"from": "human", "value": "What is this? <image>"}], True,
     VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT:"),
    # an empty system prompt drops the system block
    ("vicuna_v1", [{"role": "system", "content": ""}] + Q1, True, "USER: <image>\nWhat is this? ASSISTANT:"),
    ("qwen_2", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True,
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("name,messages,gen,expected", EXACT, ids=[f"{e[0]}-{i}" for i, e in enumerate(EXACT)])
def test_rendered_strings_exact(name, messages, gen, expected):
    assert render_prompt(name, messages, add_generation_prompt=gen) == expected


def test_named_templates_equal_the_hf_chat_templates(toks):
    qwen, llama3 = toks["qwen"], toks["llama3"]
    for conv in (Q1, Q2, Q2[:3]):
        gen = conv[-1]["role"] == "user"
        assert render_prompt("qwen_2", conv, gen) == qwen.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        sys_conv = [{"role": "system", "content": LLAMA3_SYS}] + conv
        assert render_prompt("llama_3", conv, gen) == llama3.apply_chat_template(
            sys_conv, tokenize=False, add_generation_prompt=gen)
        assert render_prompt("tokenizer", conv, gen, tokenizer=qwen) == render_prompt("qwen_2", conv, gen)


@pytest.mark.parametrize("name", NAMED)
def test_segments_concatenate_to_the_prompt_and_supervise_answers_only(name):
    conv = PLAIN_CONV if name == "plain" else CONV3
    answers = ["a red square"] if name == "plain" else ANSWERS3
    segs = get_template(name).segments(conv)
    assert "".join(s.text for s in segs) == full_text(name, conv)
    assert [s.text for s in segs if s.supervised] == [a + EOT[name] for a in answers]
    # the open-slot prompt is the history plus the generation prompt, and a prefix of the full text
    prompt = render_prompt(name, conv[:-1])
    assert full_text(name, conv).startswith(prompt)


# ============================================================================ ids and labels
@pytest.mark.parametrize("tname", TOKS)
@pytest.mark.parametrize("name", NAMED)
def test_labels_supervise_exactly_answers_plus_eot(toks, tname, name):
    tok = toks[tname]
    img = tok.convert_tokens_to_ids(IMG)
    conv, answers = (PLAIN_CONV, ["a red square"]) if name == "plain" else (CONV3, ANSWERS3)
    out = tokenize_conversation(tok, name, conv, image_token_counts=[5])
    ids, labels = out["input_ids"], out["labels"]
    assert out["num_images"] == 1

    # every supervised run decodes to exactly one answer + the end-of-turn text, nothing else is supervised
    sup = spans(ids, labels)
    assert [tok.decode(s) for s in sup] == [a + EOT[name] for a in answers]

    # the image expands to 5 masked tokens, in one run
    (start, n), = runs_of(ids, img)
    assert n == 5 and all(lab == -100 for lab in labels[start:start + 5])

    # BOS exactly once, first, masked (Llama / Llama-3); none for Qwen
    if tok.bos_token_id is not None:
        assert ids[0] == tok.bos_token_id and labels[0] == -100 and ids.count(tok.bos_token_id) == 1
    else:
        assert tname == "qwen" and tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]

    # the ids are those of the whole rendered prompt tokenized the original way (tokenizer_image_token),
    # except byte-level tokenizers keep the header/answer space of space-separated templates apart
    ref = ref_image_token_ids(tok, full_text(name, conv), [5], img)
    if tname in SP or name not in SPACE_SEPARATED:
        assert ids == ref
    else:
        assert tok.decode(ids) == tok.decode(ref)  # byte-level decoding is lossless
        starts = [k for k in range(len(ids)) if labels[k] != -100 and labels[k - 1] == -100]
        assert [tok.decode([ids[k - 1]]) for k in starts] == [" "] * len(answers)  # the separator, masked


def test_sentencepiece_answer_keeps_its_prefix_space_and_decodes_exactly(toks):
    # legacy: after </s> the next turn gets a dummy prefix; non-legacy: it does not
    for tname, legacy in (("llama_legacy", True), ("llama", False)):
        tok = toks[tname]
        user_after_eos = tok.convert_ids_to_tokens(tok("</s>USER", add_special_tokens=False)["input_ids"])[1]
        assert user_after_eos.startswith("▁") == legacy
        out = tokenize_conversation(tok, "vicuna_v1", CONV3[:4], image_token_counts=[1])
        pieces = tok.convert_ids_to_tokens(out["input_ids"])
        first_answer = [p for p, lab in zip(pieces, out["labels"]) if lab != -100][:3]
        assert first_answer == ["▁a", "▁c", "at"]  # "ASSISTANT: " | "a cat": the space is the answer's "▁"
        eos_at = pieces.index("</s>")
        assert pieces[eos_at - 2:eos_at] == ["▁c", "at"] and pieces[eos_at + 1] == user_after_eos
        # around the image exactly as the original: "USER: " ends in "▁"; the next chunk starts "▁", "\n"
        at = pieces.index(IMG)
        assert pieces[at - 2:at] == [":", "▁"] and pieces[at + 1:at + 3] == ["▁", "<0x0A>"]


def test_multi_image_expansion_in_order(toks):
    tok = toks["qwen"]
    img = tok.convert_tokens_to_ids(IMG)
    conv = [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "And these? <image> and <image>"}, {"from": "gpt", "value": "a dog"},
    ]
    out = tokenize_conversation(tok, "qwen_2", conv, image_token_counts=[2, 7, 3])
    runs = runs_of(out["input_ids"], img)
    assert [n for _, n in runs] == [2, 7, 3]
    assert all(out["labels"][s + k] == -100 for s, n in runs for k in range(n))
    # several images in one turn stay in place (no collapse, no move)
    assert "user\nAnd these? <image> and <image><|im_end|>" in full_text("qwen_2", conv)
    assert out["num_images"] == 3
    for bad in ([2, 7], [2, 7, 3, 1], [2, 0, 3]):
        with pytest.raises(ConversationError):
            tokenize_conversation(tok, "qwen_2", conv, image_token_counts=bad)


@pytest.mark.parametrize("tname", TOKS)
def test_text_only(toks, tname):
    tok = toks[tname]
    conv = [{"from": "human", "value": "Describe it"}, {"from": "gpt", "value": "a dog"}]
    for counts in (None, []):
        out = tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts)
        assert tok.convert_tokens_to_ids(IMG) not in out["input_ids"] and out["num_images"] == 0
        assert [tok.decode(s) for s in spans(out["input_ids"], out["labels"])] == ["a dog</s>"]
    with pytest.raises(ConversationError, match="placeholder"):
        tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=[4])


def test_leading_gpt_turn_dropped_and_role_content_keys(toks):
    tok = toks["llama"]
    base = tokenize_conversation(tok, "vicuna_v1", CONV3)
    assert tokenize_conversation(tok, "vicuna_v1", [{"from": "gpt", "value": "hello"}] + CONV3) == base
    roles = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in CONV3]
    assert tokenize_conversation(tok, "vicuna_v1", roles) == base


# ============================================================================ truncation
@pytest.mark.parametrize("tname", ["llama", "qwen"])
def test_truncation_drops_whole_trailing_exchanges_and_never_splits_images(toks, tname):
    tok = toks[tname]
    img = tok.convert_tokens_to_ids(IMG)
    conv = copy.deepcopy(CONV3)
    conv[2]["value"] = "<image>\nDescribe it"  # a second image in exchange 2
    counts = [20, 9]
    full = tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts)
    one = tokenize_conversation(tok, "vicuna_v1", conv[:2], image_token_counts=counts[:1])
    two = tokenize_conversation(tok, "vicuna_v1", conv[:4], image_token_counts=counts)
    n1, n2, n3 = len(one["input_ids"]), len(two["input_ids"]), len(full["input_ids"])
    assert full["input_ids"][:n2] == two["input_ids"] and full["input_ids"][:n1] == one["input_ids"]
    assert full["labels"][:n2] == two["labels"]

    assert tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=n3) == full
    assert tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=n3 - 1) == two
    assert tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=n2) == two
    # a limit that falls inside the second image drops exchange 2 entirely
    second_image = runs_of(full["input_ids"], img)[1]
    assert n1 < second_image[0] + 4 < n2
    cut = tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=second_image[0] + 4)
    assert cut == one and cut["num_images"] == 1 and [n for _, n in runs_of(cut["input_ids"], img)] == [20]
    # even the first exchange does not fit (the limit falls inside the first image)
    with pytest.raises(ConversationError, match="too long"):
        tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=10)
    with pytest.raises(ConversationError, match="too long"):
        tokenize_conversation(tok, "vicuna_v1", conv, image_token_counts=counts, max_length=n1 - 1)


# ============================================================================ errors
BAD = {  # case: (conversation, image_token_counts, message pattern)
    "user-user": ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
                  None, "alternate"),
    "gpt-gpt": ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}],
                None, "alternate"),
    "empty-answer": ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], None, "empty assistant answer"),
    "blank-answer": ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  \n"}], None, "empty assistant answer"),
    "ends-with-user": ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
                       None, "must end with an assistant answer"),
    "unknown-role": ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], None, "unknown role 'robot'"),
    "system-not-first": ([{"from": "human", "value": "a"}, {"role": "system", "content": "s"},
                          {"from": "gpt", "value": "b"}], None, "only allowed first"),
    "not-a-string": ([{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}], None, "must be a string"),
    "no-turns": ([], None, "no user turn"),
    "image-mismatch": ([{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "b"}], [3],
                       "2 <image> placeholder.* but 1 image token count"),
    "image-without-placeholder": ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], [3],
                                  "0 <image> placeholder.* but 1 image token count"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversations_raise(toks, case):
    conv, counts, pattern = BAD[case]
    with pytest.raises(ConversationError, match=pattern) as err:
        tokenize_conversation(toks["llama"], "vicuna_v1", conv, image_token_counts=counts)
    assert isinstance(err.value, ValueError)


def test_plain_takes_one_exchange(toks):
    with pytest.raises(ConversationError, match="at most 1"):
        tokenize_conversation(toks["llama"], "plain", CONV3[:4], image_token_counts=[1])


# ============================================================================ inference
@pytest.mark.parametrize("tname", TOKS)
@pytest.mark.parametrize("name", NAMED + ["tokenizer"])
def test_inference_ids_are_the_training_prefix(toks, tname, name):
    tok = toks[tname]
    img = tok.convert_tokens_to_ids(IMG)
    conv = PLAIN_CONV if name == "plain" else CONV3
    train = tokenize_conversation(tok, name, conv, image_token_counts=[4])
    prompt = build_inference_ids(tok, name, conv[:-1], image_token_counts=[4])
    assert train["input_ids"][: len(prompt)] == prompt
    assert train["labels"][len(prompt)] != -100  # the very next token starts the last answer
    assert all(lab == -100 for lab in train["labels"][len(prompt) - 1:len(prompt)])
    if name != "tokenizer" and (tname in SP or name not in SPACE_SEPARATED):
        # ... and equal to the spec's prompt string tokenized the original way
        assert prompt == ref_image_token_ids(tok, render_prompt(name, conv[:-1]), [4], img)
    with pytest.raises(ConversationError):
        build_inference_ids(tok, name, conv, image_token_counts=[4])  # ends with an answer


def test_stop_tokens(toks):
    llama, qwen, llama3 = toks["llama"], toks["qwen"], toks["llama3"]
    assert stop_strings("vicuna_v1") == ["</s>"] and stop_token_ids("vicuna_v1", llama) == [llama.eos_token_id]
    assert stop_token_ids("mistral_instruct", llama) == [2]
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids("qwen_2", qwen) == [im_end] and stop_token_ids("chatml_direct", qwen) == [im_end]
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids("llama_3", llama3) == [eot]
    assert stop_strings("tokenizer", qwen) == ["<|im_end|>"] and stop_token_ids("tokenizer", qwen) == [im_end]
    assert stop_strings("tokenizer", llama) == ["</s>"]
    assert get_template("plain").stop_strings == ("\n",)
    assert get_template("vicuna_v1").default_system == VICUNA_SYS
    assert get_template("llama_3").default_system == LLAMA3_SYS


# ============================================================================ tokenizer template
def test_tokenizer_template_matches_the_named_templates(toks):
    qwen, llama3, llama = toks["qwen"], toks["llama3"], toks["llama_legacy"]
    # Qwen's own chat template == qwen_2; Llama-3's (given the system) == llama_3; a Mistral one == mistral_instruct
    assert tokenize_conversation(qwen, "tokenizer", CONV3, image_token_counts=[3]) == tokenize_conversation(
        qwen, "qwen_2", CONV3, image_token_counts=[3])
    with_sys = [{"from": "system", "value": LLAMA3_SYS}] + CONV3
    assert tokenize_conversation(llama3, "tokenizer", with_sys, image_token_counts=[3]) == tokenize_conversation(
        llama3, "llama_3", CONV3, image_token_counts=[3])
    assert tokenize_conversation(llama, "tokenizer", CONV3, image_token_counts=[3]) == tokenize_conversation(
        llama, "mistral_instruct", CONV3, image_token_counts=[3])
    assert render_prompt("tokenizer", Q1, tokenizer=qwen) == qwen.apply_chat_template(
        Q1, tokenize=False, add_generation_prompt=True)


def test_tokenizer_template_rejects_unsplittable_chat_templates(toks):
    tok = copy.deepcopy(toks["qwen"])
    # renders only the last message: rendering k+1 messages does not extend rendering k
    tok.chat_template = "{{ '<|im_start|>' + messages[-1]['content'] + '<|im_end|>' }}"
    with pytest.raises(ConversationError, match="prefix-stable"):
        tokenize_conversation(tok, "tokenizer", CONV3[:4])
    with pytest.raises(ConversationError, match="tokenizer"):
        render_prompt("tokenizer", Q1)


# ============================================================================ original LLaVA as oracle
def _llava_wheel():
    paths = [os.environ.get("MMKIT_LLAVA_WHEEL", "")] + sorted(glob.glob("/tmp/llava_whl/llava_torch-1.2.2*.whl"))
    return next((p for p in paths if p and os.path.isfile(p)), None)


@pytest.fixture(scope="module")
def llava():
    """llava-torch 1.2.2.post1 imported straight from its wheel (test-time only)."""
    whl = _llava_wheel()
    if whl is None:
        pytest.skip("llava-torch wheel not found (pip download --no-deps llava-torch==1.2.2.post1 -d /tmp/llava_whl)")
    pytest.importorskip("torch")
    saved = {k: v for k, v in sys.modules.items() if k == "llava" or k.startswith("llava.")}
    for name, sub in (("llava", "llava"), ("llava.train", "llava/train")):
        mod = types.ModuleType(name)
        mod.__path__ = [f"{whl}/{sub}"]
        sys.modules[name] = mod
    sys.modules["llava.model"] = types.ModuleType("llava.model")  # the model code is not needed
    trainer = types.ModuleType("llava.train.llava_trainer")
    trainer.LLaVATrainer = object
    sys.modules["llava.train.llava_trainer"] = trainer
    sys.path.insert(0, whl)
    try:
        import llava.conversation as conversation
        import llava.train.train as train
        yield conversation, train
    finally:
        sys.path.remove(whl)
        for k in [k for k in sys.modules if k == "llava" or k.startswith("llava.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("legacy", [True, False])
def test_matches_original_llava_preprocess(llava, legacy):
    conversation, train = llava
    tok = _llama_sp(legacy)
    tok.pad_token, tok.model_max_length = tok.unk_token, 2048

    class DataArgs:
        is_multimodal, mm_use_im_start_end = True, False

    cases = [("v1", "vicuna_v1", CONV3, True), ("llava_v1", "llava_v1", CONV3, True),
             ("mistral_instruct", "mistral_instruct", CONV3, True), ("plain", "plain", PLAIN_CONV, True),
             ("v1", "vicuna_v1", [{"from": "human", "value": "Describe it"}, {"from": "gpt", "value": "a dog"}], False)]
    for orig_name, name, conv, has_image in cases:
        conversation.default_conversation = conversation.conv_templates[orig_name]
        src = [copy.deepcopy(conv)]
        if has_image:
            src = train.preprocess_multimodal(src, DataArgs)
        ref = train.preprocess(src, tok, has_image=has_image)
        mine = tokenize_conversation(tok, name, conv, image_token_id=-200)  # one -200 per image, as the original
        assert mine["input_ids"] == ref["input_ids"][0].tolist(), (orig_name, legacy)
        assert mine["labels"] == ref["labels"][0].tolist(), (orig_name, legacy)
        assert any(lab != -100 for lab in mine["labels"])  # the oracle did not fall into its mismatch path
    # the original Conversation.get_prompt strings
    for orig_name, name in (("vicuna_v1", "vicuna_v1"), ("llava_v1", "llava_v1"),
                            ("mistral_instruct", "mistral_instruct"), ("chatml_direct", "chatml_direct")):
        conv = conversation.conv_templates[orig_name].copy()
        conv.append_message(conv.roles[0], "<image>\nWhat is this?")
        conv.append_message(conv.roles[1], "cat")
        conv.append_message(conv.roles[0], "Describe it")
        conv.append_message(conv.roles[1], None)
        assert render_prompt(name, Q2[:3]) == conv.get_prompt()


# ============================================================================ batched path == reference path
# tokenize_conversation (default) encodes a conversation's chunks in one batched call, with caches of repeated
# chunks and SentencePiece words; reference=True tokenizes each chunk on its own. They must agree exactly.
WORDS = ["the", "cat", "dog", "a", "red", "square", "circle", "What", "is", "this", "Describe", "it", "USER:",
         "ASSISTANT:", "system", "user", "assistant", "How", "many", "shapes", "are", "there", "?", ".", ",", ":",
         "3", "42", "é", "naïve", "中文", "東京", "🙂", "Zürich", "▁", "\n", "\n\n", "\t", "'s", "(x)", "[INST]",
         "</s>", "<s>", "<|im_end|>", "<|eot_id|>", "brown", "fox", "jumps", "over", "lazy", "red", "blue"]
RARE = {"</s>", "<s>", "<|im_end|>", "<|eot_id|>", "[INST]", "▁"}


def _text(rng, lo=1, hi=12):
    out = []
    for _ in range(rng.randint(lo, hi)):
        w = rng.choice(WORDS)
        while w in RARE and rng.random() < 0.8:
            w = rng.choice(WORDS)
        out.append(w)
    text = ""
    for w in out:  # mostly single spaces; sometimes none, two, or a newline
        text += rng.choice([" "] * 8 + ["", "  ", "\n"]) + w if text else w
    if rng.random() < 0.1:
        text = " " + text
    if rng.random() < 0.1:
        text += rng.choice([" ", "  ", "\n"])
    return text


def _random_case(rng, name):
    exchanges = 1 if name == "plain" else rng.randint(1, 5)
    text_only = rng.random() < 0.2
    conv, counts = [], []
    if rng.random() < 0.4:
        conv.append({"from": "system", "value": rng.choice(["", _text(rng, 1, 20)])})
    for e in range(exchanges):
        q = _text(rng)
        n_img = 0 if text_only else (rng.choice([1, 1, 1, 2]) if e == 0 else rng.choice([0, 0, 0, 1]))
        for _ in range(n_img):
            where = rng.random()
            q = IMG + "\n" + q if where < 0.5 else (q + "\n" + IMG if where < 0.8 else q.replace(" ", f" {IMG} ", 1))
            counts.append(rng.randint(1, 7))
        answer = _text(rng, 1, 40)
        if not answer.strip():
            answer = "ok"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]
    return conv, counts


def _both(fn):
    """(result, None) or (None, error message) of fn()."""
    try:
        return fn(), None
    except ConversationError as e:
        return None, str(e)


def _compare(tok, name, conv, counts, max_length, img):
    ref, ref_err = _both(lambda: tokenize_conversation(tok, name, conv, image_token_counts=counts,
                                                       max_length=max_length, reference=True))
    for _ in range(2):  # cold, then with every chunk of this conversation cached
        got, err = _both(lambda: tokenize_conversation(tok, name, conv, image_token_counts=counts,
                                                       max_length=max_length))
        assert err == ref_err, (name, conv, max_length)
        if ref is None:
            continue
        assert got["input_ids"] == ref["input_ids"], (name, conv, max_length)
        assert got["labels"] == ref["labels"], (name, conv, max_length)
        assert got["num_images"] == ref["num_images"]
        # what a collator derives from them: attention (unpadded: all ones) and where the image tokens are
        assert [1] * len(got["input_ids"]) == [1] * len(ref["labels"])
        assert ([i for i, t in enumerate(got["input_ids"]) if t == img]
                == [i for i, t in enumerate(ref["input_ids"]) if t == img])
    return ref


# text with runs of spaces, so that the vocabulary has whitespace pieces ("▁▁", "▁▁▁▁") as Llama's has
WS_CORPUS = CORPUS + ["def f(x):\n    return x  # two  spaces", "a  b   c    d", "\tindented\n  line"] * 20


@pytest.fixture(scope="module")
def all_toks(toks):
    from mmkit.demo.tokenizer import shapes_tokenizer  # the demo's word-level tokenizer

    ws, ws_legacy = (_llama_sp(legacy, WS_CORPUS, allow_whitespace_only_pieces=True) for legacy in (False, True))
    assert "▁▁" in ws.get_vocab() and "▁▁" in ws_legacy.get_vocab()
    return {**toks, "demo": shapes_tokenizer(), "llama_ws": ws, "llama_ws_legacy": ws_legacy}


ALL_SP = SP + ("llama_ws", "llama_ws_legacy")
# the batched path with its SentencePiece shortcuts (words, the anchor) on, and with each turned off
VARIANTS = [(t, "all") for t in TOKS + ("demo", "llama_ws", "llama_ws_legacy")] + [
    (t, v) for t in ALL_SP for v in ("no_words", "no_anchor")]


def _variant(tok, variant):
    from mmkit.processing.text import _fast_info, _tok_info  # to switch the shortcuts off

    if variant == "all":
        return tok
    tok = copy.deepcopy(tok)
    fast = _fast_info(tok, _tok_info(tok))
    if variant == "no_words":
        assert fast.words is not None
        fast.words = None
    else:
        fast.anchor = fast.anchor_id = None
    return tok


@pytest.mark.parametrize("tname,variant", VARIANTS, ids=[f"{t}-{v}" for t, v in VARIANTS])
def test_batched_path_equals_reference_path(all_toks, tname, variant):
    import random

    tok = _variant(all_toks[tname], variant)
    img = tok.convert_tokens_to_ids(IMG)
    names = NAMED + (["tokenizer"] if getattr(tok, "chat_template", None) else [])
    rng = random.Random(f"batched-{tname}-{variant}")
    cases = 0
    for name in names:
        for _ in range(12):
            conv, counts = _random_case(rng, name)
            full = _compare(tok, name, conv, counts, None, img)
            cases += 1
            if full is not None:  # truncation: a limit anywhere (inside images, exchanges, the first one)
                n = len(full["input_ids"])
                _compare(tok, name, conv, counts, rng.randint(max(1, n // 4), n + 2), img)
                cases += 1
            # the generation prompt of the same chat without its last answer
            prompt = conv[:-1]
            k = sum(t["value"].count(IMG) for t in prompt if t["from"] == "human")
            ref, ref_err = _both(lambda: build_inference_ids(tok, name, prompt, image_token_counts=counts[:k],
                                                             reference=True))
            got, err = _both(lambda: build_inference_ids(tok, name, prompt, image_token_counts=counts[:k]))
            assert (got, err) == (ref, ref_err), (name, prompt)
    assert cases >= 120


class _CountingBackend:
    """Stands in for a tokenizers.Tokenizer and counts the encode calls made into it."""

    def __init__(self, inner, counter):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_counter", counter)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name.startswith("encode") and callable(attr):
            def counted(*a, **kw):
                self._counter.append(name)
                return attr(*a, **kw)
            return counted
        return attr

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


@pytest.mark.parametrize("tname", TOKS + ("demo", "llama_ws"))
def test_one_tokenizer_call_per_conversation(all_toks, tname):
    from mmkit.processing.text import _tok_info  # the prefix-less backend copy is counted too

    tok = copy.deepcopy(all_toks[tname])
    info = _tok_info(tok)
    tokenize_conversation(tok, "vicuna_v1", CONV3)  # probes the tokenizer (not counted)
    calls = []
    backend, cont = tok._tokenizer, info.cont
    tok._tokenizer = _CountingBackend(backend, calls)
    if cont is not None:
        info.cont = _CountingBackend(cont, calls)
    try:
        for i, name in enumerate(NAMED):
            unique = f"zq{i}x{tname[:2]}"  # words no cache has seen
            conv = copy.deepcopy(PLAIN_CONV if name == "plain" else CONV3)
            for t in conv:
                t["value"] += f" {unique} {unique}y"
            calls.clear()
            ref = tokenize_conversation(tok, name, conv, image_token_counts=[3], reference=True)
            per_chunk = len(calls)
            calls.clear()
            assert tokenize_conversation(tok, name, conv, image_token_counts=[3]) == ref
            fast = info.fast
            # two only where a continuation needs the prefix-less copy (legacy Llama on role-tag templates)
            limit = 1 if (info.cont is None or fast.anchor is not None or name in ("plain", "vicuna_v1",
                                                                                    "mistral_instruct")) else 2
            assert 1 <= len(calls) <= limit, (name, calls)
            assert per_chunk >= (1 if name == "plain" else 4) * len(calls)  # the reference: one per chunk
            calls.clear()
            assert tokenize_conversation(tok, name, conv, image_token_counts=[3]) == ref
            assert len(calls) <= limit  # long answers are not cached: they may be encoded again
    finally:
        tok._tokenizer, info.cont = backend, cont
    if tname in ALL_SP:  # the batched path's SentencePiece shortcuts are in use (words; the anchor when non-legacy)
        assert info.fast.words is not None and (info.fast.anchor is None) == tname.endswith("legacy")
