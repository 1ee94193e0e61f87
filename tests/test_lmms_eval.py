"""The lmms-eval adapter (mmkit.eval.lmms) against lmms-eval's real interface: its ``lmms`` base class,
``Instance`` objects built by hand the way its tasks build them, and its model registry.

No hub data: a local "task" is a dict of documents, as lmms-eval's evaluator puts into
``lm.task_dict[task][split]``. Without lmms-eval installed, only the duck-typed test runs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import mmkit
from mmkit.eval.lmms import MMKitChatLMM, MMKitLMM
from mmkit.eval.runner import answer_batch

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_IDS = range(5)  # <unk> <s> </s> <pad> <image> of the builtin word tokenizer
TASK, SPLIT = "local_shapes", "test"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mmkit.build(ROOT / "recipes" / "tiny.yaml").eval()
    with torch.no_grad():  # never emit special tokens: replies are words, so comparisons mean something
        for i in SPECIAL_IDS:
            m.llm.lm_head.weight[i].zero_()
    return m


@pytest.fixture(scope="module")
def docs():
    colors = ["red", "blue", "green"]
    return [{"image": Image.new("RGB", (32 + 8 * i, 32), c), "question": "what color is the circle ?",
             "answer": c, "choices": ["red", "blue", "green", "cyan"]} for i, c in enumerate(colors)]


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc):
    return doc["question"]


def doc_to_messages(doc):  # lmms-eval's chat message protocol
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]


def make_lm(cls, model, docs, **kw):
    lm = cls(model=model, **kw)
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def _gen_kwargs(n=3):
    return {"until": ["\n\n"], "max_new_tokens": n, "temperature": 0, "do_sample": False, "num_beams": 1}


# --------------------------------------------------------------------------- real lmms-eval interface


def test_registered_through_the_model_registry():
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from mmkit.eval.lmms import manifest

    assert issubclass(MMKitLMM, lmms) and issubclass(MMKitChatLMM, lmms)
    reg = ModelRegistryV2()
    reg.register_manifest(manifest())  # what the `lmms_eval.models` entry point hands to lmms-eval
    assert reg.get_model_class("mmkit") is MMKitChatLMM  # validated: lmms subclass, is_simple False
    assert reg.get_model_class("mmkit", force_simple=True) is MMKitLMM


def test_create_from_arg_string(model, tmp_path):
    pytest.importorskip("lmms_eval")
    d = model.save(tmp_path / "m")
    lm = MMKitLMM.create_from_arg_string(f"pretrained={d},max_new_tokens=5,template=vicuna_v1",
                                         {"batch_size": "3", "device": "cpu"})
    assert lm.batch_size == 3 and lm.max_new_tokens == 5 and lm.template == "vicuna_v1"
    assert lm.rank == 0 and lm.world_size == 1


def test_generate_until_simple_and_chat(model, docs):
    lmms_instance = pytest.importorskip("lmms_eval.api.instance")
    Instance = lmms_instance.Instance

    def meta(i):
        return {"task": TASK, "doc_id": i, "repeats": 1}

    # ConfigurableTask.construct_requests, output_type generate_until
    simple = [Instance("generate_until", (doc_to_text(d), _gen_kwargs(), doc_to_visual, i, TASK, SPLIT), idx=0,
                       metadata=meta(i)) for i, d in enumerate(docs)]
    # ConfigurableMessagesTask.construct_requests
    chat = [Instance("generate_until", (doc_to_text(d), doc_to_messages, _gen_kwargs(), i, TASK, SPLIT), idx=0,
                     metadata=meta(i)) for i, d in enumerate(docs)]

    batched = make_lm(MMKitLMM, model, docs, batch_size=3).generate_until(simple)
    one_by_one = make_lm(MMKitLMM, model, docs, batch_size=1).generate_until(simple)
    via_chat = make_lm(MMKitChatLMM, model, docs, batch_size=2).generate_until(chat)
    assert all(isinstance(t, str) and t for t in batched)
    assert batched == one_by_one == via_chat
    # the same answers python -m mmkit.eval gives for these questions
    qs = [{"question_id": i, "text": d["question"], "_image": d["image"]} for i, d in enumerate(docs)]
    assert batched == answer_batch(model, qs, None, max_new_tokens=3)
    assert all(len(t.split()) <= 3 for t in batched)  # max_new_tokens=3 words of the word tokenizer


def test_until_strings_stop_generation(model, docs):
    Instance = pytest.importorskip("lmms_eval.api.instance").Instance
    lm = make_lm(MMKitLMM, model, docs)
    req = lambda gk: Instance("generate_until", (doc_to_text(docs[0]), gk, doc_to_visual, 0, TASK, SPLIT),  # noqa: E731
                              idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    full = lm.generate_until([req(_gen_kwargs(6))])[0]
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = lm.generate_until([req({**_gen_kwargs(6), "until": [stop]})])[0]
    assert cut == full[:full.index(stop)].strip() and len(cut) < len(full)


def _ll_requests(Instance, docs, doc_id=0):
    d = docs[doc_id]
    # ConfigurableTask.construct_requests, output_type multiple_choice (target_delimiter " ")
    return [Instance("loglikelihood", (doc_to_text(d), " " + c, doc_to_visual, doc_id, TASK, SPLIT), idx=i,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}) for i, c in enumerate(d["choices"])]


def test_loglikelihood_matches_a_direct_forward_pass(model, docs):
    Instance = pytest.importorskip("lmms_eval.api.instance").Instance
    lm = make_lm(MMKitLMM, model, docs, batch_size=4)
    reqs = _ll_requests(Instance, docs)
    res = lm.loglikelihood(reqs)
    assert len(res) == 4 and all(isinstance(lp, float) and isinstance(g, bool) for lp, g in res)

    # oracle: the next-token distribution after the generation prompt (each choice is one word = one token)
    inputs = model.processor(images=[docs[0]["image"]], text=["<image>\nwhat color is the circle ?"],
                             template=model.template)
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
    tok = model.tokenizer
    ids = [tok.convert_tokens_to_ids(c) for c in docs[0]["choices"]]
    assert [lp for lp, _ in res] == pytest.approx([float(logp[i]) for i in ids], abs=1e-4)
    best = int(logp.argmax())
    assert [g for _, g in res] == [i == best for i in ids]

    # batch composition does not change the numbers (right padding)
    single = make_lm(MMKitLMM, model, docs, batch_size=1).loglikelihood(reqs)
    assert [lp for lp, _ in single] == pytest.approx([lp for lp, _ in res], abs=1e-4)


def test_loglikelihood_of_the_greedy_continuation_is_greedy(model, docs):
    Instance = pytest.importorskip("lmms_eval.api.instance").Instance
    lm = make_lm(MMKitLMM, model, docs, batch_size=2)
    greedy = lm.generate_until([Instance("generate_until", (doc_to_text(docs[1]), _gen_kwargs(3), doc_to_visual, 1,
                                                           TASK, SPLIT), idx=0,
                                         metadata={"task": TASK, "doc_id": 1, "repeats": 1})])[0]
    assert len(greedy.split()) == 3
    other = greedy.rsplit(" ", 1)[0] + " " + ("red" if not greedy.endswith("red") else "blue")
    (lp_g, is_g), (lp_o, is_o) = lm.loglikelihood([
        Instance("loglikelihood", (doc_to_text(docs[1]), " " + c, doc_to_visual, 1, TASK, SPLIT), idx=i,
                 metadata={"task": TASK, "doc_id": 1, "repeats": 1}) for i, c in enumerate([greedy, other])])
    assert is_g and not is_o
    assert lp_g > lp_o and lp_g < 0


def test_loglikelihood_request_variants(model, docs):
    Instance = pytest.importorskip("lmms_eval.api.instance").Instance
    lm = make_lm(MMKitLMM, model, docs)
    plain = lm.loglikelihood(_ll_requests(Instance, docs)[:1])[0]
    # output_type loglikelihood: the target is doc_to_target, a callable on the document
    via_target = lm.loglikelihood([Instance("loglikelihood", (doc_to_text(docs[0]), lambda d: d["choices"][0],
                                                              doc_to_visual, 0, TASK, SPLIT), idx=0,
                                            metadata={"task": TASK, "doc_id": 0, "repeats": 1})])[0]
    assert via_target[0] == pytest.approx(plain[0], abs=1e-5)
    # acc_mutual_info's unconditional request: (context, continuation) only, no image
    uncond = lm.loglikelihood([Instance("loglikelihood", ("", "red"), idx=0,
                                        metadata={"task": TASK, "doc_id": 0, "repeats": 1})])[0]
    assert isinstance(uncond[0], float) and uncond[0] < 0


# --------------------------------------------------------------------------- without lmms-eval


def test_duck_typed_instances(model, docs):
    """The adapter only reads ``.args``: any object with lmms-eval's argument layout works."""
    lm = make_lm(MMKitLMM, model, docs, batch_size=2)
    gen = [SimpleNamespace(args=(doc_to_text(d), _gen_kwargs(2), doc_to_visual, i, TASK, SPLIT))
           for i, d in enumerate(docs)]
    out = lm.generate_until(gen)
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    older_chat = [SimpleNamespace(args=(doc_to_messages, _gen_kwargs(2), i, TASK, SPLIT)) for i in range(3)]
    assert lm.generate_until(older_chat) == out
    ll = lm.loglikelihood([SimpleNamespace(args=(doc_to_text(docs[0]), " red", doc_to_visual, 0, TASK, SPLIT))])
    assert len(ll) == 1 and ll[0][0] < 0


def test_non_image_visuals_are_rejected(model, docs):
    lm = make_lm(MMKitLMM, model, docs)
    req = SimpleNamespace(args=("describe", _gen_kwargs(2), lambda d: ["/data/clip.mp4"], 0, TASK, SPLIT))
    with pytest.raises(ValueError, match="images only"):
        lm.generate_until([req])
