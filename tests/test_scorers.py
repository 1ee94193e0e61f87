"""Hand-worked tests for mmkit.eval.scorers and the mmkit.eval.score CLI.

All expected numbers are worked out by hand in the comments.  Pure Python,
no model code: the whole file runs in about a second.
"""

import json
import os
import subprocess
import sys

import pytest

from mmkit.demo import scorer as demo_scorer
from mmkit.eval import scorers as S
from mmkit.eval.score import build_parser, format_metrics, main as cli_main
from mmkit.registry import scorers


def approx(x):
    return pytest.approx(x, abs=1e-9)


def ans(qid, text, **kw):
    return {"question_id": qid, "prompt": "q", "text": text, "answer_id": "x", "model_id": "m", "metadata": {}, **kw}


# ---------------------------------------------------------------------------
# VQAv2 normalisation (official vqaEval.py)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),                      # number word -> digit (after lowercasing)
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),              # only none/zero..ten are mapped
        ("a dog", "dog"),                  # article dropped
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),                 # contraction table
        ("Dont", "don't"),                 # lowercased first, then looked up
        ("isnt it", "isn't it"),
        ("somebody'd", "somebodyd"),       # the table's own quirk, kept verbatim
        ("Im", "im"),                      # capitalised keys never match after lower()
        ("don't", "don't"),                # apostrophe is not punctuation
        ("1,000", "1000"),                 # digit,digit -> every punct mark deleted
        ("1,000 cars, 2 dogs", "1000 cars 2 dogs"),
        ("red, blue", "red blue"),         # ", " occurs -> ',' deleted
        ("red,blue", "red blue"),          # no adjacent space, no digits -> ',' becomes ' '
        ("hello-world", "hello world"),
        ("hello - world", "hello world"),  # "- " occurs -> '-' deleted, spaces collapse on split
        ("(a) dog", "dog"),                # '(' -> ' ', ') ' occurs so ')' deleted, 'a' dropped
        ("3.5", "3.5"),                    # period followed by a digit is kept
        ("It is 3.", "it is 3"),           # trailing period dropped
        ("yes.", "yes"),
        ("Yes.", "yes"),
        ("e.g. cars", "eg cars"),
        ("  yes\n", "yes"),                # newline -> space, strip
        ("left\tside", "left side"),
        ("What?!", "what"),                # no adjacent space -> each replaced by ' ', then split
        ("50%", "50%"),                    # '%' is not in the punctuation list
    ],
)
def test_vqa_normalize_prediction(raw, expected):
    assert S.vqa_normalize_prediction(raw) == expected


def test_vqa_punctuation_rules_directly():
    # '/' without adjacent space becomes a space; with one it is deleted.
    assert S.vqa_process_punctuation("black/white") == "black white"
    assert S.vqa_process_punctuation("black / white") == "black  white"
    # The decision uses the *input* text for every mark: one "? " anywhere
    # deletes all '?' marks, while ';' (no adjacent space) becomes a space.
    assert S.vqa_process_punctuation("a?b? c;d") == "ab c d"
    # periods: only those not followed by a digit are removed
    assert S.vqa_process_punctuation("v1.2.") == "v1.2"
    assert S.vqa_process_punctuation(".5") == ".5"
    # process_digit_article does not touch punctuation
    assert S.vqa_process_digit_article("The Two dogs.") == "2 dogs."
    # The official code passes re.UNICODE (=32) as sub()'s count: at most 32 periods go.
    assert S.vqa_process_punctuation("." * 40) == "." * 8


def test_vqa_leave_one_out_arithmetic():
    # 4+ matching GTs: every leave-one-out subset still has >= 3 matches -> 1.0
    assert S.vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == approx(1.0)
    # 3 matches: dropping a "dog" leaves 2 -> 2/3 (3 times); dropping a "cat"
    # leaves 3 -> 1 (7 times).  (3*2/3 + 7*1) / 10 = 9/10
    assert S.vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == approx(0.9)
    # 2 matches: dropping a "dog" -> 1/3 (x2); dropping a "cat" -> 2/3 (x8).
    # (2/3 + 16/3) / 10 = 6/10
    assert S.vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == approx(0.6)
    # 1 match: dropping it -> 0; dropping any of 9 others -> 1/3.  3/10
    assert S.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == approx(0.3)
    assert S.vqa_accuracy("bird", ["dog"] + ["cat"] * 9) == approx(0.0)
    # normalisation of the prediction: "A Dog." -> "dog"
    assert S.vqa_accuracy("A Dog.", ["dog"] * 3 + ["cat"] * 7) == approx(0.9)


def test_vqa_gt_processing_quirks():
    # GTs all identical -> NOT punctuation-processed: "yes." never equals the
    # processed prediction "yes".
    assert S.vqa_accuracy("yes.", ["yes."] * 10) == approx(0.0)
    # Not all identical -> all GTs punctuation-processed: 10 x "yes" -> 1.0
    assert S.vqa_accuracy("yes.", ["yes."] * 9 + ["yes"]) == approx(1.0)
    # GTs are never digit/article-processed: only the 2 literal "2"s match "Two".
    # dropping a "2" -> 1/3 (x2); dropping a "two" -> 2/3 (x8) -> 0.6
    assert S.vqa_accuracy("Two", ["two"] * 8 + ["2"] * 2) == approx(0.6)
    # GT "1,000" (mixed list) is processed to "1000"; 3 of them + 7 "1000" -> 10 matches
    assert S.vqa_accuracy("1,000", ["1,000"] * 3 + ["1000"] * 7) == approx(1.0)


def test_score_vqav2_overall_and_answer_types():
    gts = [
        {"question_id": 1, "answers": ["2"] * 10, "answer_type": "number"},
        {"question_id": 2, "answers": ["dog"] * 2 + ["cat"] * 8, "answer_type": "other"},
        # official annotation layout with dicts is accepted as well
        {"question_id": 3, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
         "answer_type": "yes/no"},
    ]
    answers = [ans(1, "Two"), ans(2, "a dog"), ans(3, "no")]
    m = S.score_vqav2(answers, gts)
    # per question: 1.0, 0.6, 0.0 -> mean 1.6/3 = 53.33%
    assert m["accuracy"] == approx(160 / 3)
    assert m["per_answer_type"] == {"number": approx(100.0), "other": approx(60.0), "yes/no": approx(0.0)}
    assert m["n"] == 3 and m["n_missing"] == 0 and m["n_unknown"] == 0 and m["warnings"] == []
    gts[0]["question_type"] = "how many"
    assert S.score_vqav2(answers, gts)["per_question_type"] == {"how many": approx(100.0)}


# ---------------------------------------------------------------------------
# TextVQA (EvalAI processor)
# ---------------------------------------------------------------------------


def test_evalai_normalize():
    assert S.evalai_normalize("Joe's Cafe") == "joe 's cafe"   # "'s" split off
    assert S.evalai_normalize("red,blue") == "redblue"         # ',' dropped before punctuation
    assert S.evalai_normalize("1,000") == "1000"
    assert S.evalai_normalize("What?") == "what"
    assert S.evalai_normalize("The Two Dogs.") == "2 dogs"
    assert S.evalai_normalize("dont") == "don't"


def test_textvqa_scoring():
    # GTs are processed too: 3 x "joe 's cafe" and 7 x "joes cafe".
    # pred "Joe's Cafe?" -> "joe 's cafe": dropping one of the 3 -> 2/3 (x3),
    # dropping one of the 7 -> 1 (x7) -> (2 + 7)/10 = 0.9
    assert S.textvqa_accuracy("Joe's Cafe?", ["joe's cafe"] * 3 + ["joes cafe"] * 7) == approx(0.9)
    gts = [
        {"question_id": "a", "answers": ["joe's cafe"] * 3 + ["joes cafe"] * 7},
        # identical GTs ARE processed in TextVQA (unlike VQAv2): "STOP." -> "stop"
        {"question_id": "b", "answers": ["STOP."] * 10},
    ]
    m = S.score_textvqa([ans("a", "Joe's Cafe?"), ans("b", "stop")], gts)
    # (0.9 + 1.0) / 2 = 95%
    assert m["accuracy"] == approx(95.0)
    assert "per_answer_type" not in m


# ---------------------------------------------------------------------------
# GQA and the demo's shapes task (exact match)
# ---------------------------------------------------------------------------


def test_gqa():
    gts = [
        {"question_id": "g1", "answer": "yes"},
        {"question_id": "g2", "answer": "dog"},
        {"question_id": "g3", "answer": "dog"},
        {"question_id": "g4", "answer": "left"},
    ]
    answers = [
        ans("g1", "Yes."),       # rstrip('.').lower() -> "yes"   right
        ans("g2", "Dog"),        # -> "dog"                        right
        ans("g3", "the dog"),    # no article stripping            wrong
        ans("g4", "left side"),  #                                 wrong
    ]
    m = S.score_gqa(answers, gts)
    assert m["correct"] == 2 and m["accuracy"] == approx(50.0)
    assert S.gqa_normalize("Yes..") == "yes"


def test_shapes_per_category():
    gts = [
        {"question_id": 1, "answer": "red", "category": "colour"},
        {"question_id": 2, "answer": "circle", "category": "shape"},
        {"question_id": 3, "answer": "red circle", "category": "shape"},
        {"question_id": 4, "answer": "3", "category": "count"},
    ]
    answers = [ans(1, "Red."), ans(2, "  Circle "), ans(3, "a red circle"), ans(4, "three")]
    m = demo_scorer.score_shapes(answers, gts)
    # right: 1 ("red"), 2 ("circle"); wrong: 3 (article kept), 4 (no number words)
    assert m["accuracy"] == approx(50.0)
    assert m["per_category"]["colour"]["accuracy"] == approx(100.0)
    assert m["per_category"]["shape"] == {"accuracy": approx(50.0), "correct": 1, "n": 2}
    assert m["per_category"]["count"]["accuracy"] == approx(0.0)
    assert demo_scorer.shapes_normalize(" Square. ") == "square"


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a cat.", "yes"),
        ("No.", "no"),
        ("not sure", "no"),
        ("No, there is no cat.", "no"),
        ("There is a dog in the image.", "yes"),
        ("I think so. No doubt", "yes"),   # only the first sentence counts
        ("NO", "yes"),                     # only No/not/no count (case-sensitive)
        ("no,", "no"),                     # ',' removed before splitting
        ("Nope", "yes"),
    ],
)
def test_pope_parse(text, expected):
    assert S.pope_parse(text) == expected


def test_score_pope_metrics():
    gts = [
        {"question_id": 1, "label": "yes", "category": "random"},
        {"question_id": 2, "label": "no", "category": "random"},
        {"question_id": 3, "label": "yes", "category": "random"},
        {"question_id": 4, "label": "no", "category": "random"},
        {"question_id": 5, "label": "yes", "category": "random"},
        {"question_id": 6, "label": "no", "category": "popular"},
    ]
    answers = [
        ans(1, "Yes, there is a cat."),           # yes / yes  TP
        ans(2, "No."),                            # no  / no   TN
        ans(3, "not sure"),                       # no  / yes  FN
        ans(4, "There is a dog in the image."),   # yes / no   FP
        ans(5, "I think so. No doubt"),           # yes / yes  TP
        ans(6, "NO"),                             # yes / no   FP
    ]
    m = S.score_pope(answers, gts)
    r = m["per_category"]["random"]
    # random: TP=2 FP=1 TN=1 FN=1, N=5
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 1, 1)
    assert r["accuracy"] == approx(60.0)            # (2+1)/5
    assert r["precision"] == approx(200 / 3)        # 2/3
    assert r["recall"] == approx(200 / 3)           # 2/3
    assert r["f1"] == approx(200 / 3)               # P == R -> F1 = 2/3
    assert r["yes_ratio"] == approx(60.0)           # predicted yes 3 / 5
    p = m["per_category"]["popular"]
    # popular: TP=0 FP=1 TN=0 FN=0 -> recall 0/0 and F1 0/0 guarded to 0
    assert p["accuracy"] == approx(0.0) and p["precision"] == approx(0.0)
    assert p["recall"] == approx(0.0) and p["f1"] == approx(0.0)
    assert p["yes_ratio"] == approx(100.0)
    # pooled: TP=2 FP=2 TN=1 FN=1 -> acc 3/6, P 2/4, R 2/3, F1 = 2*.5*(2/3)/(.5+2/3) = 4/7
    assert m["accuracy"] == approx(50.0)
    assert m["precision"] == approx(50.0)
    assert m["recall"] == approx(200 / 3)
    assert m["f1"] == approx(400 / 7)
    assert m["yes_ratio"] == approx(400 / 6)        # 4 predicted yes / 6
    assert m["category_mean_f1"] == approx((200 / 3 + 0) / 2)


def test_pope_all_no_guards_division():
    gts = [{"question_id": i, "label": "no", "category": "adversarial"} for i in range(3)]
    m = S.score_pope([ans(i, "No") for i in range(3)], gts)
    # TP=FP=FN=0: precision/recall/F1 would be 0/0 -> 0; accuracy 100; yes-ratio 0
    assert m["accuracy"] == approx(100.0) and m["f1"] == approx(0.0) and m["yes_ratio"] == approx(0.0)


def test_pope_bad_label():
    with pytest.raises(S.EvalInputError, match=r"annotations\[0\].*label"):
        S.score_pope([ans(1, "yes")], [{"question_id": 1, "label": "maybe"}])


# ---------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"), ("no.", "no"), ("Y", "yes"), ("n", "no"), ("x", "other"),
        ("Yes, there is", "yes"),   # "yes" within the first 4 chars
        ("No, it is not", "no"),
        ("Nope", "no"),             # "no" within "nope"
        ("The answer is no", "other"),
        ("I don't know", "other"),
    ],
)
def test_mme_parse(text, expected):
    assert S.mme_parse(text) == expected


def test_score_mme_acc_plus():
    gts = [
        {"question_id": 1, "image": "e1.jpg", "category": "existence", "label": "Yes"},
        {"question_id": 2, "image": "e1.jpg", "category": "existence", "label": "No"},
        {"question_id": 3, "image": "e2.jpg", "category": "existence", "label": "Yes"},
        {"question_id": 4, "image": "e2.jpg", "category": "existence", "label": "No"},
        {"question_id": 5, "image": "c1.png", "category": "code_reasoning", "label": "Yes"},
        {"question_id": 6, "image": "c1.png", "category": "code_reasoning", "label": "No"},
    ]
    answers = [
        ans(1, "Yes"),                 # right
        ans(2, "Yes, there is"),       # parsed yes, label no -> wrong (image e1 half right)
        ans(3, "yes."),                # right
        ans(4, "n"),                   # right (e2 fully right)
        ans(5, "Y"),                   # right
        ans(6, "The answer is no"),    # "other" -> wrong
    ]
    m = S.score_mme(answers, gts)
    e = m["per_category"]["existence"]
    # acc = 3/4 questions = 75; acc+ = 1/2 images = 50; score 125
    assert e["acc"] == approx(75.0) and e["acc_plus"] == approx(50.0) and e["score"] == approx(125.0)
    c = m["per_category"]["code_reasoning"]
    # acc = 1/2 = 50; acc+ = 0/1 = 0; score 50
    assert c["acc"] == approx(50.0) and c["acc_plus"] == approx(0.0) and c["score"] == approx(50.0)
    assert m["perception"] == approx(125.0)
    assert m["cognition"] == approx(50.0)
    assert m["total"] == approx(175.0)
    assert "OCR" in m["missing_categories"] and "existence" not in m["missing_categories"]


def test_mme_category_names_and_odd_image():
    gts = [
        {"question_id": 1, "image": "o.jpg", "category": "ocr", "label": "Yes"},
        {"question_id": 2, "image": "o.jpg", "category": "ocr", "label": "No"},
        {"question_id": 3, "image": "p.jpg", "category": "Text Translation", "label": "No"},
    ]
    m = S.score_mme([ans(1, "yes"), ans(2, "no"), ans(3, "no")], gts)
    assert m["per_category"]["OCR"]["score"] == approx(200.0)
    assert m["per_category"]["text_translation"]["score"] == approx(200.0)
    assert m["perception"] == approx(200.0) and m["cognition"] == approx(200.0)
    # p.jpg has a single question -> warned, not dropped
    assert any("p.jpg" in w and "1 questions" in w for w in m["warnings"])


# ---------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("The answer is B.", "B"),
        ("C. apples", "C"),
        ("E", "E"),
        ("F", "FAILED"),                          # exact letter only accepts A-E
        ("The answer is F.", "F"),                # regex accepts any capital letter
        ("b", "FAILED"),                          # case-sensitive
        ("The answer is A. The answer is B.", "FAILED"),   # regex must match exactly once
        ("The answer is A. Or the answer is B.", "A"),     # ... and is case-sensitive
        ("C.apples", "FAILED"),                   # needs "X. " with the space
        ("apples", "FAILED"),
    ],
)
def test_scienceqa_parse(text, expected):
    assert S.scienceqa_parse(text) == expected


def test_score_scienceqa():
    gts = [
        {"question_id": "q1", "answer": "B", "num_choices": 3, "has_image": True},
        {"question_id": "q2", "answer": 2, "choices": ["pears", "figs", "apples", "plums"], "has_image": True},
        {"question_id": "q3", "answer": "A", "num_choices": 2, "has_image": True},
        {"question_id": "q4", "answer": "A", "num_choices": 2, "has_image": False},
        {"question_id": "q5", "answer": "A", "num_choices": 5},                  # IMG from prompt
        {"question_id": "q6", "answer": "B", "num_choices": 3, "has_image": False},
        {"question_id": "q7", "answer": "A", "num_choices": 2, "has_image": False},
    ]
    answers = [
        ans("q1", "The answer is B."),                    # B == B          right  (IMG)
        ans("q2", "C. apples"),                           # C == index 2    right  (IMG)
        ans("q3", "C"),                                   # C beyond 2 choices -> wrong (IMG)
        ans("q4", "A"),                                   # right
        {"question_id": "q5", "prompt": "<image>\nWhich?", "text": "The answer is A. The answer is B."},
        #                                                   FAILED -> wrong (IMG via prompt)
        ans("q6", "b"),                                   # FAILED -> wrong
        ans("q7", "The answer is F."),                    # F out of range -> wrong
    ]
    m = S.score_scienceqa(answers, gts)
    # correct: q1, q2, q4 -> 3/7
    assert m["correct"] == 3 and m["accuracy"] == approx(300 / 7)
    # IMG: q1, q2, q3, q5 -> 2 right of 4
    assert m["n_img"] == 4 and m["img_accuracy"] == approx(50.0)
    assert m["n_failed"] == 2  # q5, q6


def test_scienceqa_missing_is_failed_and_warned():
    gts = [{"question_id": 1, "answer": "A", "num_choices": 2, "has_image": True},
           {"question_id": 2, "answer": "B", "num_choices": 2, "has_image": True}]
    m = S.score_scienceqa([ans(1, "A")], gts)
    assert m["accuracy"] == approx(50.0) and m["n_missing"] == 1 and m["n_failed"] == 1
    assert any("question_id 2" in w for w in m["warnings"])
    with pytest.raises(S.EvalInputError, match="question_id 2"):
        S.score_scienceqa([ans(1, "A")], gts, strict=True)


def test_scienceqa_bad_gold():
    with pytest.raises(S.EvalInputError, match="outside"):
        S.score_scienceqa([ans(1, "A")], [{"question_id": 1, "answer": "C", "num_choices": 2}])


# ---------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------


def test_mmbench_can_infer_option():
    f = S.mmbench_can_infer_option
    assert f("B") == "B"
    assert f("A") == "A"
    assert f("A. dog") == "A"                     # "A." pattern
    assert f("The answer is (D)") == "D"           # "(D)" pattern
    assert f("Answer: C).") == "C"                 # "C)." pattern
    assert f("A cat") == "A"                       # short text: a lone A is the option
    assert f("A dog is shown here") is None        # >3 words: the lone A is an article
    assert f("B or C") is None                     # two letters -> undecided
    assert f("Failed to obtain answer via API") is None
    assert S.mmbench_can_infer_text("It is red", {"A": "blue", "B": "Red"}) == "B"
    assert S.mmbench_can_infer_text("red and blue", {"A": "blue", "B": "red"}) is None


def _rot(idx, answer, opts, cat):
    return {"index": idx, "answer": answer, "category": cat,
            **{k: v for k, v in zip("ABCD", opts)}}  # MMBench-tsv style A/B/C/D columns


def test_mmbench_circular_one_rotated_row_wrong():
    k = S.MMBENCH_CIRCULAR_STRIDE
    gts = [
        # question 5: "dog" is right; four rotations
        _rot(5, "B", ["cat", "dog", "bird", "fish"], "attr"),
        _rot(5 + k, "A", ["dog", "bird", "fish", "cat"], "attr"),
        _rot(5 + 2 * k, "D", ["bird", "fish", "cat", "dog"], "attr"),
        _rot(5 + 3 * k, "C", ["fish", "cat", "dog", "bird"], "attr"),
        # question 6: two rotations, both right
        {"index": 6, "answer": "A", "category": "colour", "options": {"A": "red", "B": "blue"}},
        {"index": 6 + k, "answer": "B", "category": "colour", "options": ["blue", "red"]},
        # question 7: single row; "A" in long text is an article, then text match
        {"index": 7, "answer": "B", "category": "colour", "options": {"A": "cat", "B": "dog"}},
    ]
    answers = [
        {"question_id": 5, "text": "B"},                    # right
        {"question_id": 5 + k, "text": "A. dog"},           # right ("A.")
        {"question_id": 5 + 2 * k, "text": "The answer is (D)"},   # right ("(D)")
        {"question_id": 5 + 3 * k, "text": "cat"},          # text match -> B, answer C: WRONG
        {"question_id": 6, "text": "A"},                    # right
        {"question_id": 6 + k, "text": "It is red"},        # text match -> B, right
        {"question_id": 7, "text": "A dog is shown here"},  # article A skipped; "dog" -> B right
    ]
    m = S.score_mmbench(answers, gts)
    # question 5 is a miss because of its last rotation; 6 and 7 are hits -> 2/3
    assert m["n_questions"] == 3 and m["n_rows"] == 7 and m["hits"] == 2
    assert m["accuracy"] == approx(200 / 3)
    assert m["per_category"] == {"attr": approx(0.0), "colour": approx(100.0)}
    assert m["n_unresolved"] == 0 and m["warnings"] == []


def test_mmbench_llava_rounds_and_missing_round():
    gts = [
        {"index": 8, "answer": "C", "category": "x", "options": ["p", "q", "r"]},
        {"index": 9, "answer": "A", "category": "x", "options": ["s", "t"]},
    ]
    # Round r shows the options rotated left r times, so the right letter for
    # question 8 (answer index 2) is (2 - r) % 3: C, B, A.
    answers = [
        {"question_id": 8, "round_id": 0, "text": "C"},
        {"question_id": 8, "round_id": 1, "text": "B"},
        {"question_id": 8, "round_id": 2, "text": "r"},   # text match in round-2 options [r, p, q] -> A
        {"question_id": 9, "round_id": 0, "text": "A"},   # round 1 of question 9 is missing
    ]
    m = S.score_mmbench(answers, gts)
    assert m["hits"] == 1 and m["accuracy"] == approx(50.0)
    assert m["n_missing"] == 1
    assert any("round 1" in w for w in m["warnings"])
    # duplicate (index, round) is an error
    with pytest.raises(S.EvalInputError, match="duplicate"):
        S.score_mmbench(answers + [{"question_id": 8, "round_id": 1, "text": "B"}], gts)


def test_mmbench_unresolved_counts_wrong():
    gts = [{"index": 1, "answer": "A", "category": "c", "options": {"A": "yes", "B": "no"}}]
    m = S.score_mmbench([{"question_id": 1, "text": "unclear"}], gts)
    assert m["accuracy"] == approx(0.0) and m["n_unresolved"] == 1
    # substring matching is literal: "no" occurs inside "cannot" -> B
    assert S.mmbench_extract("I cannot tell", {"A": "yes", "B": "no"}) == "B"


# ---------------------------------------------------------------------------
# Bad input: readers, duplicates, unknown and missing ids
# ---------------------------------------------------------------------------


def test_read_jsonl_line_numbers(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 2, "text": "b"}\n')
    rows = S.read_answers(str(p))
    assert [r.line for r in rows] == [1, 3]        # blank line skipped, numbering kept
    assert rows[1].where.endswith("a.jsonl:3")

    # U+2028 is legal unescaped inside a JSON string and must not split the line
    p.write_text('{"question_id": 1, "text": "a\u2028b"}\n{"question_id": 2, "text": "c"}\n', encoding="utf-8")
    rows = S.read_answers(str(p))
    assert rows[0]["text"] == "a\u2028b" and rows[1].line == 2

    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": }\n')
    with pytest.raises(S.EvalInputError, match=r"a\.jsonl:2: malformed JSON"):
        S.read_answers(str(p))

    p.write_text('{"question_id": 1, "text": "a"}\n[1, 2]\n')
    with pytest.raises(S.EvalInputError, match=r"a\.jsonl:2: expected a JSON object"):
        S.read_answers(str(p))

    p.write_text('{"question_id": 1, "text": 5}\n')
    with pytest.raises(S.EvalInputError, match=r"a\.jsonl:1: .*must be a string"):
        S.read_answers(str(p))

    p.write_text('{"text": "x"}\n')
    with pytest.raises(S.EvalInputError, match=r"a\.jsonl:1: answer has no question_id"):
        S.read_answers(str(p))


def test_read_json_array_and_mapping(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text('[\n  {"question_id": 1, "answer": "x"},\n\n  {"question_id": 2,\n   "answer": "y"}\n]\n')
    rows = S.read_annotations(str(p))
    assert [r.line for r in rows] == [2, 4]
    p.write_text('[\n  {"question_id": 1},\n  {"question_id": 2,}\n]\n')
    with pytest.raises(S.EvalInputError, match=r"gt\.json:3: malformed JSON"):
        S.read_annotations(str(p))
    p.write_text('{"7": {"answer": "x"}, "8": {"answer": "y"}}')
    rows = S.read_annotations(str(p))
    assert [r["question_id"] for r in rows] == ["7", "8"]
    m = S.score_gqa([ans(7, "x")], rows)             # "7" and 7 are the same id
    assert m["accuracy"] == approx(50.0) and m["n_missing"] == 1


def test_duplicates_unknown_missing(tmp_path):
    gts = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}]
    with pytest.raises(S.EvalInputError, match=r"answers\[1\]: duplicate answer for question_id 1"):
        S.score_gqa([ans(1, "a"), ans("1", "a")], gts)
    with pytest.raises(S.EvalInputError, match=r"annotations\[1\]: duplicate question_id 1"):
        S.score_gqa([ans(1, "a")], [gts[0], gts[0]])
    with pytest.raises(S.EvalInputError, match="missing required field 'answer'"):
        S.score_gqa([ans(1, "a")], [{"question_id": 1}])

    # line numbers flow from the reader into the warnings
    p = tmp_path / "ans.jsonl"
    p.write_text(json.dumps(ans(1, "a")) + "\n" + json.dumps(ans(99, "z")) + "\n")
    m = S.score_gqa(S.read_answers(str(p)), gts)
    assert m["accuracy"] == approx(50.0)             # missing q2 scored wrong, not dropped
    assert m["n_unknown"] == 1 and m["n_missing"] == 1
    assert any("ans.jsonl:2" in w and "unknown question_id 99" in w for w in m["warnings"])
    assert any("annotations[1]" in w and "no answer for question_id 2" in w for w in m["warnings"])
    with pytest.raises(S.EvalInputError, match="unknown question_id 99"):
        S.score_gqa(S.read_answers(str(p)), gts, strict=True)


def test_score_dispatch_and_format():
    m = S.score("shapes", [ans(1, "x")], [{"question_id": 1, "answer": "x", "category": "c"}])
    assert m["accuracy"] == approx(100.0)
    text = format_metrics(m)
    assert "accuracy" in text and "100.00" in text and "[per_category]" in text
    with pytest.raises(ValueError, match="unknown task"):
        S.score("nope", [], [])


def test_scorer_registry_builtin_and_plugin_tasks():
    builtin = {"vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa", "mmbench"}
    assert builtin <= set(scorers.names())
    assert scorers.get("gqa") is S.score_gqa
    assert scorers.get("shapes") is demo_scorer.score_shapes  # the demo's, through the mmkit.scorers entry point
    with pytest.raises(ValueError) as err:
        S.score("shapez", [], [])
    assert str(err.value).startswith("unknown task 'shapez'; did you mean 'shapes'? choices: ")
    task = build_parser()._option_string_actions["--task"]
    assert task.choices == scorers.names()  # the CLI's choices are the registry's


def test_scorer_registered_at_runtime_is_a_cli_task(tmp_path):
    def score_first_letter(answers, annotations, strict=False):
        return S.score_exact("first_letter", answers, annotations, lambda t: t[:1], lambda t: t[:1], strict)

    (tmp_path / "gt.jsonl").write_text('{"question_id": 1, "answer": "red"}\n')
    (tmp_path / "ans.jsonl").write_text(json.dumps(ans(1, "rose")) + "\n")
    scorers.register("first_letter", obj=score_first_letter)
    try:
        out = tmp_path / "m.json"
        assert cli_main(["--task", "first_letter", "--answers", str(tmp_path / "ans.jsonl"),
                         "--annotations", str(tmp_path / "gt.jsonl"), "--output", str(out), "--quiet"]) == 0
    finally:
        scorers.unregister("first_letter")
    assert json.loads(out.read_text())["accuracy"] == approx(100.0)
    assert "first_letter" not in scorers


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _run_cli(*args, cwd):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "mmkit.eval.score", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_malformed_line_names_line(tmp_path):
    (tmp_path / "gt.jsonl").write_text('{"question_id": 1, "answer": "red", "category": "colour"}\n')
    (tmp_path / "ans.jsonl").write_text(
        json.dumps(ans(1, "red")) + "\n\n" + '{"question_id": 2, "text": "blue"\n'  # line 3 is broken
    )
    r = _run_cli("--task", "shapes", "--answers", "ans.jsonl", "--annotations", "gt.jsonl", cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "ans.jsonl:3" in err and "malformed JSON" in err


def test_cli_success_writes_json(tmp_path):
    (tmp_path / "gt.jsonl").write_text(
        '{"question_id": 1, "answer": "red", "category": "colour"}\n'
        '{"question_id": 2, "answer": "circle", "category": "shape"}\n'
    )
    (tmp_path / "ans.jsonl").write_text(json.dumps(ans(1, "Red.")) + "\n" + json.dumps(ans(2, "square")) + "\n")
    out = tmp_path / "out" / "metrics.json"
    rc = cli_main(["--task", "shapes", "--answers", str(tmp_path / "ans.jsonl"),
                   "--annotations", str(tmp_path / "gt.jsonl"), "--output", str(out), "--quiet"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["task"] == "shapes" and m["accuracy"] == approx(50.0)
    assert m["per_category"]["colour"]["accuracy"] == approx(100.0)


def test_cli_strict_and_help(tmp_path, capsys):
    (tmp_path / "gt.jsonl").write_text('{"question_id": 1, "answer": "a"}\n{"question_id": 2, "answer": "b"}\n')
    (tmp_path / "ans.jsonl").write_text(json.dumps(ans(1, "a")) + "\n")
    rc = cli_main(["--task", "gqa", "--answers", str(tmp_path / "ans.jsonl"),
                   "--annotations", str(tmp_path / "gt.jsonl")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "50.00" in captured.out and "no answer for question_id 2" in captured.err
    rc = cli_main(["--task", "gqa", "--answers", str(tmp_path / "ans.jsonl"),
                   "--annotations", str(tmp_path / "gt.jsonl"), "--strict"])
    assert rc == 2
    assert "gt.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert "--annotations" in capsys.readouterr().out
