"""Pure-Python benchmark scorers for LLaVA-style evaluation outputs.

No third-party dependencies: every scorer takes plain Python data (lists of
dicts) and returns a dict of metrics.  **All rates are percentages in
[0, 100]** (accuracy, precision, recall, F1, yes-ratio, hit rate, MME acc/acc+).

Answers (model outputs)
-----------------------
The LLaVA answers jsonl written by ``model_vqa_loader.py``-style scripts, one
object per line::

    {"question_id": 1, "prompt": "...", "text": "<model output>",
     "answer_id": "...", "model_id": "...", "metadata": {}}

Only the id and the prediction are used.  The id is read from
``question_id`` (aliases: ``questionId``, ``index``) and the prediction from
``text`` (aliases: ``prediction``, ``answer``), so EvalAI / GQA submission
files (``[{"question_id", "answer"}]``, ``[{"questionId", "prediction"}]``)
work too.  ``prompt`` is used by ScienceQA when the annotation has no
``has_image``.  MMBench answers may carry LLaVA's ``round_id`` and ``options``.

Annotation (ground-truth) formats, one JSON object per line (JSONL) or a JSON
array of the same objects:

* ``vqav2``, ``textvqa``:
  ``{"question_id", "answers": [10 strings | {"answer": str, ...}],
  "answer_type"?: str, "question_type"?: str}``
* ``gqa``: ``{"question_id", "answer": str, "category"?: str}``
* ``pope``: ``{"question_id", "label": "yes"|"no", "category"?: str}``
  (category is ``adversarial``/``popular``/``random`` in LLaVA's files)
* ``mme``: ``{"question_id", "image": str, "category": str,
  "label": "Yes"|"No"}`` (two questions per image)
* ``scienceqa``: ``{"question_id", "answer": "A".."E" | int index,
  "num_choices": int (or "choices": [..]), "has_image"?: bool}``
* ``mmbench``: ``{"index": int, "answer": "A".."E", "category"?: str,
  "options"?: {"A": str, ...} | [str, ...]}`` (plain ``"A"``..``"E"`` keys as
  in the MMBench tsv are accepted too).  Circular rows carry
  ``index + k*1_000_000``.

More tasks register in ``mmkit.registry.scorers`` (entry-point group
``mmkit.scorers``); the demo's ``shapes`` task is :mod:`mmkit.demo.scorer`,
built on :func:`score_exact`.

Ids: integers and integer-looking strings are matched as integers (``"7"``
and ``7`` are the same question); anything else is matched as a string.

Bad input policy (nothing is dropped silently):

* malformed JSON, non-object rows, missing/ill-typed required fields and
  duplicate ids raise :class:`EvalInputError` whose message names the file and
  line (or ``answers[i]`` / ``annotations[i]`` for in-memory lists);
* answers whose id is not in the annotations are ignored but reported in the
  returned ``warnings`` list (``n_unknown``);
* annotated questions without an answer are scored as wrong and reported in
  ``warnings`` (``n_missing``).
* ``strict=True`` turns every warning into an :class:`EvalInputError`.
"""

from __future__ import annotations

import json
import re
import string
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mmkit.registry import UnknownNameError, scorers

__all__ = [
    "EvalInputError",
    "Record",
    "read_records",
    "read_answers",
    "read_annotations",
    "vqa_process_punctuation",
    "vqa_process_digit_article",
    "vqa_normalize_prediction",
    "vqa_accuracy",
    "evalai_normalize",
    "textvqa_accuracy",
    "pope_parse",
    "mme_parse",
    "scienceqa_parse",
    "mmbench_can_infer_option",
    "mmbench_can_infer_text",
    "mmbench_extract",
    "gqa_normalize",
    "score_exact",
    "score_vqav2",
    "score_textvqa",
    "score_gqa",
    "score_pope",
    "score_mme",
    "score_scienceqa",
    "score_mmbench",
    "score",
    "MME_PERCEPTION",
    "MME_COGNITION",
]

MAX_WARNINGS = 50  # warnings kept verbatim in the metrics; the rest are counted


# ---------------------------------------------------------------------------
# Errors, records, readers
# ---------------------------------------------------------------------------


class EvalInputError(ValueError):
    """Bad evaluation input.  ``str(err)`` is a single line naming the location."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class Record(dict):
    """A dict that remembers where it was read from (``source``, ``line``)."""

    source: str = ""
    line: Optional[int] = None

    def __init__(self, data: Mapping[str, Any], source: str = "", line: Optional[int] = None):
        super().__init__(data)
        self.source = source
        self.line = line

    @property
    def where(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}"


def _where(row: Any, fallback: str) -> str:
    w = getattr(row, "where", None)
    return w if w else fallback


def _line_of(text: str, pos: int, start_pos: int = 0, start_line: int = 1) -> int:
    return start_line + text.count("\n", start_pos, pos)


def _parse_json_array(text: str, path: str) -> List[Record]:
    """Parse a JSON array element by element so each item keeps its line number."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    pos = text.index("[") + 1
    line_pos, line_no = 0, 1
    out: List[Record] = []

    def line_at(p: int) -> int:
        nonlocal line_pos, line_no
        line_no = _line_of(text, p, line_pos, line_no)
        line_pos = p
        return line_no

    def skip(p: int) -> int:
        while p < len(text) and text[p] in ws:
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        tail = skip(pos + 1)
        if tail != len(text):
            raise EvalInputError(f"{path}:{line_at(tail)}", "unexpected data after the JSON array")
        return out
    while True:
        ln = line_at(pos)
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalInputError(f"{path}:{ln}", f"expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, path, ln))
        pos = skip(end)
        if pos >= len(text):
            raise EvalInputError(f"{path}:{line_at(len(text))}", "malformed JSON: unterminated array")
        if text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if text[pos] == "]":
            tail = skip(pos + 1)
            if tail != len(text):
                raise EvalInputError(f"{path}:{line_at(tail)}", "unexpected data after the JSON array")
            return out
        raise EvalInputError(f"{path}:{line_at(pos)}", "malformed JSON: expected ',' or ']' between array items")


def read_records(path: str) -> List[Record]:
    """Read a JSONL file, a JSON array of objects, or a JSON object mapping id -> object.

    Blank lines in JSONL are skipped.  Every record keeps its 1-based line
    number.  For an ``{id: {...}}`` mapping the key is stored as
    ``question_id`` unless the object already has one.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise EvalInputError(path, "file not found") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(path, f"not UTF-8 text ({e.reason})") from None
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        return _parse_json_array(text, path)
    # A whole-file JSON object whose values are all objects is an id -> record map.
    if stripped[0] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            out = []
            for k, v in whole.items():
                rec = dict(v)
                rec.setdefault("question_id", k)
                out.append(Record(rec, path, None))
            # Line numbers are unknown in this layout; name the key instead.
            for r in out:
                r.source = f"{path}[{r['question_id']!r}]"
            return out
    out = []
    # Split on "\n" only: str.splitlines() would also break on U+2028 etc.,
    # which JSON allows unescaped inside strings.
    for ln, raw in enumerate(text.split("\n"), start=1):
        s = raw.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{ln}", f"malformed JSON line: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalInputError(f"{path}:{ln}", f"expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, path, ln))
    return out


def read_answers(path: str) -> List[Record]:
    """Read a LLaVA answers file (``{question_id, prompt, text, answer_id, model_id, metadata}``).

    Every row must have an id (``question_id``/``questionId``/``index``) and a
    string prediction (``text``/``prediction``/``answer``).  Duplicate ids are
    checked by the scorers (MMBench answers may repeat an id with different
    ``round_id``).
    """
    rows = read_records(path)
    for r in rows:
        _answer_id(r, r.where)
        _prediction(r, r.where)
    return rows


def read_annotations(path: str) -> List[Record]:
    """Read an annotation / answer-key file (JSONL or JSON; see module docstring)."""
    return read_records(path)


# ---------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------

_INT_RE = re.compile(r"-?\d+")


def _norm_id(v: Any, where: str, field: str) -> Any:
    if isinstance(v, bool) or v is None:
        raise EvalInputError(where, f"invalid {field} {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise EvalInputError(where, f"invalid {field} {v!r}")
    if isinstance(v, str):
        s = v.strip()
        if _INT_RE.fullmatch(s) and str(int(s)) == s:
            return int(s)
        if not s:
            raise EvalInputError(where, f"empty {field}")
        return v
    raise EvalInputError(where, f"invalid {field} of type {type(v).__name__}")


_ID_KEYS = ("question_id", "questionId", "index")
_PRED_KEYS = ("text", "prediction", "answer")


def _answer_id(row: Mapping[str, Any], where: str) -> Any:
    if not isinstance(row, Mapping):
        raise EvalInputError(where, f"expected an object, got {type(row).__name__}")
    for k in _ID_KEYS:
        if k in row:
            return _norm_id(row[k], where, k)
    raise EvalInputError(where, "answer has no question_id")


def _prediction(row: Mapping[str, Any], where: str) -> str:
    for k in _PRED_KEYS:
        if k in row:
            v = row[k]
            if not isinstance(v, str):
                raise EvalInputError(where, f"answer field {k!r} must be a string, got {type(v).__name__}")
            return v
    raise EvalInputError(where, "answer has no 'text' field")


def _req(row: Mapping[str, Any], key: str, where: str, types: Any = None, tname: str = "") -> Any:
    if not isinstance(row, Mapping):
        raise EvalInputError(where, f"expected an object, got {type(row).__name__}")
    if key not in row:
        raise EvalInputError(where, f"missing required field {key!r}")
    v = row[key]
    if types is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in _as_tuple(types)):
        raise EvalInputError(where, f"field {key!r} must be {tname or types}, got {type(v).__name__}")
    return v


def _as_tuple(t: Any) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _opt_str(row: Mapping[str, Any], key: str, where: str, default: str) -> str:
    v = row.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise EvalInputError(where, f"field {key!r} must be a string")
    return str(v)


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


class _Warnings:
    def __init__(self, strict: bool):
        self.strict = strict
        self.items: List[str] = []
        self.count = 0

    def add(self, where: str, message: str) -> None:
        if self.strict:
            raise EvalInputError(where, message)
        self.count += 1
        if len(self.items) < MAX_WARNINGS:
            self.items.append(f"{where}: {message}")

    def export(self) -> List[str]:
        out = list(self.items)
        if self.count > len(self.items):
            out.append(f"... and {self.count - len(self.items)} more warnings")
        return out


def _index_annotations(
    annotations: Sequence[Mapping[str, Any]], id_key: str = "question_id"
) -> "OrderedDict[Any, Tuple[Mapping[str, Any], str]]":
    out: "OrderedDict[Any, Tuple[Mapping[str, Any], str]]" = OrderedDict()
    for i, row in enumerate(annotations):
        where = _where(row, f"annotations[{i}]")
        qid = _norm_id(_req(row, id_key, where), where, id_key)
        if qid in out:
            raise EvalInputError(where, f"duplicate {id_key} {qid!r} in annotations (first at {out[qid][1]})")
        out[qid] = (row, where)
    return out


def _match_answers(
    answers: Sequence[Mapping[str, Any]],
    ann_index: Mapping[Any, Tuple[Mapping[str, Any], str]],
    warns: _Warnings,
) -> Tuple[Dict[Any, Tuple[str, Mapping[str, Any]]], int]:
    """Map id -> (prediction, answer row); report duplicates (error) and unknown ids (warning)."""
    preds: Dict[Any, Tuple[str, Mapping[str, Any]]] = {}
    seen: Dict[Any, str] = {}
    n_unknown = 0
    for i, row in enumerate(answers):
        where = _where(row, f"answers[{i}]")
        qid = _answer_id(row, where)
        text = _prediction(row, where)
        if qid in seen:
            raise EvalInputError(where, f"duplicate answer for question_id {qid!r} (first at {seen[qid]})")
        seen[qid] = where
        if qid not in ann_index:
            n_unknown += 1
            warns.add(where, f"answer for unknown question_id {qid!r} ignored")
            continue
        preds[qid] = (text, row)
    return preds, n_unknown


def _finish(metrics: Dict[str, Any], warns: _Warnings, n_missing: int, n_unknown: int) -> Dict[str, Any]:
    metrics["n_missing"] = n_missing
    metrics["n_unknown"] = n_unknown
    metrics["warnings"] = warns.export()
    return metrics


# ---------------------------------------------------------------------------
# VQAv2 (official GT-Vision-Lab vqaEval.py rules)
# ---------------------------------------------------------------------------

# The official evaluator's contraction table, verbatim (including its quirks:
# the capitalised keys can never match after lowercasing, and
# "somebody'd" maps to "somebodyd").
CONTRACTIONS: Dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
             ">", "<", "@", "`", ",", "?", "!")
# Kept exactly as in the official code: "(?!<=\d)" is a (buggy) negative
# *lookahead*, so in practice a period is removed unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP_VQA = re.compile(r"(\d)(\,)(\d)")
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The official code passes re.UNICODE (== 32) positionally as sub()'s *count*.
_PERIOD_SUB_COUNT = 32


def _process_punctuation(text: str, comma_re: "re.Pattern[str]") -> str:
    out = text
    digit_comma = comma_re.search(text) is not None
    for p in VQA_PUNCT:
        # The tests look at the *input* text, not the progressively edited one.
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def vqa_process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: delete or space-replace punctuation, drop bare periods."""
    return _process_punctuation(text, _COMMA_STRIP_VQA)


def vqa_process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits, drop articles, contractions."""
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize_prediction(text: str) -> str:
    """Normalise a VQAv2 prediction exactly as the official evaluator does."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    """Mean over each GT left out of min(1, #matches among the others / 3)."""
    total = 0.0
    n_match = sum(1 for g in gts if g == pred)
    for g in gts:
        m = n_match - (1 if g == pred else 0)
        total += min(1.0, m / 3.0)
    return total / len(gts)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction in [0, 1] (official rules)."""
    pred = vqa_normalize_prediction(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [vqa_process_punctuation(g) for g in gts]
    return _leave_one_out(pred, gts)


def _gt_answer_list(row: Mapping[str, Any], where: str) -> List[str]:
    answers = _req(row, "answers", where, list, "a list")
    if not answers:
        raise EvalInputError(where, "field 'answers' is empty")
    out = []
    for a in answers:
        if isinstance(a, Mapping):
            a = a.get("answer")
        if not isinstance(a, str):
            raise EvalInputError(where, "every entry of 'answers' must be a string or {'answer': str}")
        out.append(a)
    return out


def _score_soft_vqa(
    task: str,
    answers: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    acc_fn: Callable[[str, List[str]], float],
    strict: bool,
) -> Dict[str, Any]:
    warns = _Warnings(strict)
    ann = _index_annotations(annotations)
    preds, n_unknown = _match_answers(answers, ann, warns)
    total = 0.0
    by_type: Dict[str, List[float]] = defaultdict(list)
    by_qtype: Dict[str, List[float]] = defaultdict(list)
    n_missing = 0
    for qid, (row, where) in ann.items():
        gts = _gt_answer_list(row, where)
        atype = _opt_str(row, "answer_type", where, "")
        qtype = _opt_str(row, "question_type", where, "")
        if qid in preds:
            acc = acc_fn(preds[qid][0], gts)
        else:
            n_missing += 1
            warns.add(where, f"no answer for question_id {qid!r} (scored 0)")
            acc = 0.0
        total += acc
        if atype:
            by_type[atype].append(acc)
        if qtype:
            by_qtype[qtype].append(acc)
    metrics: Dict[str, Any] = {
        "task": task,
        "n": len(ann),
        "accuracy": _pct(total, len(ann)),
    }
    if by_type:
        metrics["per_answer_type"] = {t: _pct(sum(v), len(v)) for t, v in sorted(by_type.items())}
    if by_qtype:
        metrics["per_question_type"] = {t: _pct(sum(v), len(v)) for t, v in sorted(by_qtype.items())}
    return _finish(metrics, warns, n_missing, n_unknown)


def score_vqav2(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """VQAv2 accuracy (x100), overall and per ``answer_type``.

    Prediction: newline/tab -> space, strip, processPunctuation,
    processDigitArticle.  GT answers: processPunctuation only, and only if
    they are not all identical.  Per question: mean over the GTs of
    ``min(1, matches among the other GTs / 3)``.
    """
    return _score_soft_vqa("vqav2", answers, annotations, vqa_accuracy, strict)


# ---------------------------------------------------------------------------
# TextVQA (EvalAI / MMF answer processor, LLaVA m4c_evaluator)
# ---------------------------------------------------------------------------


def evalai_normalize(text: str) -> str:
    """EvalAI answer processor: lowercase, drop ',' and '?', split "'s", then the VQA steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text, _COMMA_STRIP_EVALAI)
    return vqa_process_digit_article(text)


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction in [0, 1] (processor applied to prediction and all GTs)."""
    pred = evalai_normalize(prediction)
    gts = [evalai_normalize(g) for g in gt_answers]
    return _leave_one_out(pred, gts)


def score_textvqa(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """TextVQA accuracy (x100): EvalAI processor on prediction and GTs, then leave-one-out min(1, m/3)."""
    return _score_soft_vqa("textvqa", answers, annotations, textvqa_accuracy, strict)


# ---------------------------------------------------------------------------
# Exact-match tasks: GQA (and the demo's shapes task, mmkit.demo.scorer)
# ---------------------------------------------------------------------------


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA conversion: ``text.rstrip('.').lower()`` (the gold answer is compared verbatim)."""
    return text.rstrip(".").lower()


def score_exact(
    task: str,
    answers: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    norm_pred: Callable[[str], str],
    norm_gold: Callable[[str], str],
    strict: bool = False,
) -> Dict[str, Any]:
    """Exact match of ``norm_pred(prediction)`` with ``norm_gold(annotation["answer"])``, overall and per
    ``category`` (annotations ``{"question_id", "answer": str, "category"?: str}``)."""
    warns = _Warnings(strict)
    ann = _index_annotations(annotations)
    preds, n_unknown = _match_answers(answers, ann, warns)
    correct = 0
    cats: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    n_missing = 0
    for qid, (row, where) in ann.items():
        gold = _req(row, "answer", where, str, "a string")
        cat = _opt_str(row, "category", where, "")
        if qid in preds:
            ok = int(norm_pred(preds[qid][0]) == norm_gold(gold))
        else:
            n_missing += 1
            warns.add(where, f"no answer for question_id {qid!r} (scored 0)")
            ok = 0
        correct += ok
        if cat:
            cats[cat][0] += ok
            cats[cat][1] += 1
    metrics: Dict[str, Any] = {"task": task, "n": len(ann), "correct": correct, "accuracy": _pct(correct, len(ann))}
    if cats:
        metrics["per_category"] = {
            c: {"accuracy": _pct(k, n), "correct": k, "n": n} for c, (k, n) in sorted(cats.items())
        }
    return _finish(metrics, warns, n_missing, n_unknown)


def score_gqa(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """GQA accuracy: ``prediction.rstrip('.').lower() == answer`` (per ``category`` too if given)."""
    return score_exact("gqa", answers, annotations, gqa_normalize, lambda g: g, strict)


# ---------------------------------------------------------------------------
# POPE (LLaVA eval_pope.py)
# ---------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """LLaVA POPE parsing: first sentence, drop ',', split on ' '; any No/not/no -> 'no' else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def _binary_metrics(tp: int, fp: int, tn: int, fn: int) -> Dict[str, Any]:
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": _pct(tp + tn, n),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": _pct(tp + fp, n),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def score_pope(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """POPE: accuracy, precision, recall, F1 and yes-ratio (predicted yes / N), per category and pooled.

    A missing answer is counted as a wrong prediction (the opposite of the label).
    """
    warns = _Warnings(strict)
    ann = _index_annotations(annotations)
    preds, n_unknown = _match_answers(answers, ann, warns)
    counts: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0, 0])  # tp fp tn fn
    n_missing = 0
    for qid, (row, where) in ann.items():
        label = _req(row, "label", where, str, "a string").strip().lower()
        if label not in ("yes", "no"):
            raise EvalInputError(where, f"POPE label must be 'yes' or 'no', got {row['label']!r}")
        cat = _opt_str(row, "category", where, "default")
        if qid in preds:
            pred = pope_parse(preds[qid][0])
        else:
            n_missing += 1
            warns.add(where, f"no answer for question_id {qid!r} (scored wrong)")
            pred = "no" if label == "yes" else "yes"
        c = counts[cat]
        if pred == "yes":
            c[0 if label == "yes" else 1] += 1
        else:
            c[2 if label == "no" else 3] += 1
    per_cat = {cat: _binary_metrics(*c) for cat, c in sorted(counts.items())}
    pooled = [sum(c[i] for c in counts.values()) for i in range(4)]
    metrics: Dict[str, Any] = {"task": "pope", "n": len(ann)}
    metrics.update({k: v for k, v in _binary_metrics(*pooled).items() if k != "n"})
    if per_cat:
        metrics["category_mean_accuracy"] = sum(m["accuracy"] for m in per_cat.values()) / len(per_cat)
        metrics["category_mean_f1"] = sum(m["f1"] for m in per_cat.values()) / len(per_cat)
    metrics["per_category"] = per_cat
    return _finish(metrics, warns, n_missing, n_unknown)


# ---------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_CANON = {c.lower(): c for c in MME_PERCEPTION + MME_COGNITION}


def mme_parse(text: str) -> str:
    """MME parsing: lower, strip, remove '.'; yes/no, y/n, else yes/no within the first 4 chars, else 'other'."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _mme_category(cat: str) -> str:
    key = cat.strip().lower().replace(" ", "_")
    return _MME_CANON.get(key, cat)


def score_mme(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """MME: per category acc (questions), acc+ (images with all questions right), score = acc + acc+.

    ``perception`` sums the scores of the 10 perception categories, ``cognition``
    those of the 4 cognition categories (absent categories contribute 0 and are
    listed in ``missing_categories``).
    """
    warns = _Warnings(strict)
    ann = _index_annotations(annotations)
    preds, n_unknown = _match_answers(answers, ann, warns)
    # category -> image -> list of 0/1
    per: Dict[str, "OrderedDict[str, List[int]]"] = defaultdict(OrderedDict)
    first_where: Dict[Tuple[str, str], str] = {}
    n_missing = 0
    for qid, (row, where) in ann.items():
        image = _req(row, "image", where, (str, int), "a string")
        cat = _mme_category(_req(row, "category", where, str, "a string"))
        label = _req(row, "label", where, str, "a string").strip().lower()
        if label not in ("yes", "no"):
            raise EvalInputError(where, f"MME label must be 'Yes' or 'No', got {row['label']!r}")
        if qid in preds:
            ok = int(mme_parse(preds[qid][0]) == label)
        else:
            n_missing += 1
            warns.add(where, f"no answer for question_id {qid!r} (scored wrong)")
            ok = 0
        per[cat].setdefault(str(image), []).append(ok)
        first_where.setdefault((cat, str(image)), where)
    per_cat: Dict[str, Dict[str, Any]] = {}
    for cat in sorted(per, key=lambda c: (c not in MME_PERCEPTION + MME_COGNITION, c)):
        images = per[cat]
        for img, oks in images.items():
            if len(oks) != 2:
                warns.add(first_where[(cat, img)], f"MME image {img!r} ({cat}) has {len(oks)} questions, expected 2")
        nq = sum(len(v) for v in images.values())
        acc = _pct(sum(sum(v) for v in images.values()), nq)
        acc_plus = _pct(sum(1 for v in images.values() if all(v)), len(images))
        per_cat[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                        "n_questions": nq, "n_images": len(images)}
        if cat not in MME_PERCEPTION and cat not in MME_COGNITION:
            warns.add("", f"MME category {cat!r} is neither perception nor cognition (not summed)")
    perception = float(sum(per_cat[c]["score"] for c in MME_PERCEPTION if c in per_cat))
    cognition = float(sum(per_cat[c]["score"] for c in MME_COGNITION if c in per_cat))
    missing = [c for c in MME_PERCEPTION + MME_COGNITION if c not in per_cat]
    metrics: Dict[str, Any] = {
        "task": "mme",
        "n": len(ann),
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "per_category": per_cat,
        "missing_categories": missing,
    }
    return _finish(metrics, warns, n_missing, n_unknown)


# ---------------------------------------------------------------------------
# ScienceQA (LLaVA eval_science_qa.py)
# ---------------------------------------------------------------------------

SCIENCEQA_OPTIONS = "ABCDE"
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str, options: str = SCIENCEQA_OPTIONS) -> str:
    """LLaVA ScienceQA letter parsing; returns a letter or ``"FAILED"``.

    In order: the exact letter; a leading ``"X. "``; ``The answer is ([A-Z]).``
    matching exactly once.
    """
    if text in options and len(text) == 1:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return "FAILED"


def _sqa_pred_index(letter: str, num_choices: int, options: str = SCIENCEQA_OPTIONS) -> int:
    valid = options[:num_choices]
    return valid.index(letter) if len(letter) == 1 and letter in valid else -1


def score_scienceqa(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """ScienceQA: accuracy and IMG accuracy (x100).

    FAILED parses and letters beyond ``num_choices`` are wrong.  IMG
    questions are those with ``has_image`` true (or, if the annotation lacks
    it, whose answer ``prompt`` contains ``<image>``).
    """
    warns = _Warnings(strict)
    ann = _index_annotations(annotations)
    preds, n_unknown = _match_answers(answers, ann, warns)
    correct = n_img = correct_img = n_failed = n_missing = 0
    for qid, (row, where) in ann.items():
        if "num_choices" in row:
            nc = _req(row, "num_choices", where, int, "an integer")
        elif "choices" in row:
            nc = len(_req(row, "choices", where, list, "a list"))
        else:
            raise EvalInputError(where, "missing required field 'num_choices' (or 'choices')")
        if nc < 1:
            raise EvalInputError(where, f"num_choices must be >= 1, got {nc}")
        gold = _req(row, "answer", where, (str, int), "a letter or an index")
        if isinstance(gold, str):
            g = gold.strip().upper()
            if len(g) != 1 or not ("A" <= g <= "Z"):
                raise EvalInputError(where, f"answer must be a letter or an index, got {gold!r}")
            gold_idx = ord(g) - ord("A")
        else:
            gold_idx = gold
        if not 0 <= gold_idx < nc:
            raise EvalInputError(where, f"answer {gold!r} is outside the {nc} choices")
        if qid in preds:
            text, arow = preds[qid]
            letter = scienceqa_parse(text)
            prompt = arow.get("prompt", "") if isinstance(arow, Mapping) else ""
        else:
            n_missing += 1
            warns.add(where, f"no answer for question_id {qid!r} (scored as FAILED)")
            letter, prompt = "FAILED", ""
        if letter == "FAILED":
            n_failed += 1
        ok = int(_sqa_pred_index(letter, nc) == gold_idx)
        if "has_image" in row and row["has_image"] is not None:
            is_img = bool(row["has_image"])
        else:
            is_img = isinstance(prompt, str) and "<image>" in prompt
        correct += ok
        if is_img:
            n_img += 1
            correct_img += ok
    metrics: Dict[str, Any] = {
        "task": "scienceqa",
        "n": len(ann),
        "correct": correct,
        "accuracy": _pct(correct, len(ann)),
        "n_img": n_img,
        "img_accuracy": _pct(correct_img, n_img) if n_img else None,
        "n_failed": n_failed,
    }
    return _finish(metrics, warns, n_missing, n_unknown)


# ---------------------------------------------------------------------------
# MMBench (circular; lmms-eval mmbench_evals.py extraction without a GPT judge)
# ---------------------------------------------------------------------------

MMBENCH_CIRCULAR_STRIDE = 1_000_000
_MMB_TUPS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
             (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def mmbench_can_infer_option(answer: str, choices: str = "ABCDE") -> Optional[str]:
    """Find a standalone option letter (``B``, ``B.``, ``(B)``, ``B)``, ``B:``, ...).

    A lone ``A`` in text of more than 3 words is treated as an article.
    Returns the letter or ``None``.
    """
    if "Failed to obtain answer via API" in answer:
        return None
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in choices if prefix + c + suffix in splits)

    if count() == 1 and not ("A" in splits and len(splits) > 3):
        for ch in choices:
            if ch in splits:
                return ch
    for pre, suf in _MMB_TUPS:
        if count(pre, suf) == 1:
            for ch in choices:
                if pre + ch + suf in splits:
                    return ch
    return None


def mmbench_can_infer_text(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """Return the letter whose option text is the only one contained in the answer (case-insensitive)."""
    a = answer.lower()
    cands = [k for k, v in options.items() if str(v).lower() in a]
    return cands[0] if len(cands) == 1 else None


def mmbench_extract(answer: str, options: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``can_infer_option`` then ``can_infer_text``; ``None`` if neither decides (no GPT judge)."""
    letter = mmbench_can_infer_option(answer)
    if letter is None and options:
        letter = mmbench_can_infer_text(answer, options)
    return letter


def _mmb_options(row: Mapping[str, Any], where: str) -> "OrderedDict[str, str]":
    opts = row.get("options")
    out: "OrderedDict[str, str]" = OrderedDict()
    if opts is None:
        for ch in "ABCDE":
            v = row.get(ch)
            if v is not None and str(v) != "nan" and str(v) != "":
                out[ch] = str(v)
        return out
    if isinstance(opts, Mapping):
        for k in opts:
            if not isinstance(k, str) or len(k) != 1 or k not in string.ascii_uppercase:
                raise EvalInputError(where, f"option keys must be single letters, got {k!r}")
        for k in sorted(opts):
            v = opts[k]
            if v is not None and str(v) != "nan" and str(v) != "":
                out[k] = str(v)
        return out
    if isinstance(opts, list):
        for i, v in enumerate(opts):
            if v is not None and str(v) != "nan" and str(v) != "":
                out[string.ascii_uppercase[i]] = str(v)
        return out
    raise EvalInputError(where, "field 'options' must be an object or a list")


def score_mmbench(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """MMBench circular hit rate, overall and per category (and per ``l2-category`` if given).

    Rows are grouped by ``index % 1_000_000``; a question is a hit only if
    every row of its group is answered correctly.  Answers are matched to rows
    by ``index`` (= ``question_id``).  LLaVA ``--all-rounds`` answers (same
    ``question_id``, ``round_id`` = r, options rotated left r times) are
    mapped to the virtual row ``index + r*1_000_000`` whose expected letter is
    the rotated answer; when any answer has ``round_id`` > 0, every annotated
    question with options expects all ``len(options)`` rounds.  Unresolved
    extractions (no GPT judge here) count as wrong and are reported in
    ``n_unresolved``.
    """
    warns = _Warnings(strict)
    # Annotation rows keyed by index.
    rows: "OrderedDict[int, Dict[str, Any]]" = OrderedDict()
    for i, row in enumerate(annotations):
        where = _where(row, f"annotations[{i}]")
        key = "index" if "index" in row else "question_id"
        idx = _norm_id(_req(row, key, where), where, key)
        if not isinstance(idx, int) or idx < 0:
            raise EvalInputError(where, f"MMBench index must be a non-negative integer, got {idx!r}")
        if idx in rows:
            raise EvalInputError(where, f"duplicate index {idx} in annotations (first at {rows[idx]['where']})")
        ans = _req(row, "answer", where, str, "a letter").strip().upper()
        if len(ans) != 1 or ans not in string.ascii_uppercase:
            raise EvalInputError(where, f"answer must be a single letter, got {row['answer']!r}")
        opts = _mmb_options(row, where)
        if opts and ans not in opts:
            raise EvalInputError(where, f"answer {ans!r} is not one of the options {list(opts)}")
        rows[idx] = {
            "where": where,
            "answer": ans,
            "options": opts,
            "category": _opt_str(row, "category", where, "uncategorized"),
            "l2": _opt_str(row, "l2-category", where, "") or _opt_str(row, "l2_category", where, ""),
        }

    # Parse answers; detect LLaVA round mode.
    parsed: List[Tuple[int, int, str, Mapping[str, Any], str]] = []
    for i, arow in enumerate(answers):
        where = _where(arow, f"answers[{i}]")
        qid = _answer_id(arow, where)
        text = _prediction(arow, where)
        r = arow.get("round_id", 0)
        if r is None:
            r = 0
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise EvalInputError(where, f"round_id must be a non-negative integer, got {r!r}")
        if not isinstance(qid, int) or qid < 0:
            parsed.append((-1, r, text, arow, where))
            warns.add(where, f"answer for unknown index {qid!r} ignored")
            continue
        parsed.append((qid, r, text, arow, where))
    round_mode = any(r > 0 for _, r, _, _, _ in parsed)
    if round_mode:
        for idx in [k for k in rows if k < MMBENCH_CIRCULAR_STRIDE]:
            base = rows[idx]
            n = len(base["options"])
            if n == 0:
                continue
            letters = list(base["options"])
            texts = [base["options"][k] for k in letters]
            a = letters.index(base["answer"])
            for r in range(1, n):
                vidx = idx + r * MMBENCH_CIRCULAR_STRIDE
                if vidx in rows:
                    continue
                rot = texts[r:] + texts[:r]
                rows[vidx] = {
                    "where": f"{base['where']} (round {r})",
                    "answer": string.ascii_uppercase[(a - r) % n],
                    "options": OrderedDict(zip(string.ascii_uppercase, rot)),
                    "category": base["category"],
                    "l2": base["l2"],
                }

    preds: Dict[int, Tuple[str, Mapping[str, Any]]] = {}
    seen: Dict[int, str] = {}
    n_unknown = sum(1 for p in parsed if p[0] < 0)
    for qid, r, text, arow, where in parsed:
        if qid < 0:
            continue
        if r > 0 and qid >= MMBENCH_CIRCULAR_STRIDE:
            raise EvalInputError(where, f"round_id {r} given for a circular index {qid}")
        vidx = qid + r * MMBENCH_CIRCULAR_STRIDE
        if vidx in seen:
            raise EvalInputError(where, f"duplicate answer for index {qid} round {r} (first at {seen[vidx]})")
        seen[vidx] = where
        if vidx not in rows:
            n_unknown += 1
            warns.add(where, f"answer for unknown index {qid!r}" + (f" round {r}" if r else "") + " ignored")
            continue
        preds[vidx] = (text, arow)

    groups: "OrderedDict[int, List[int]]" = OrderedDict()
    for idx in sorted(rows):
        groups.setdefault(idx % MMBENCH_CIRCULAR_STRIDE, []).append(idx)

    n_missing = n_unresolved = 0
    hits: Dict[int, int] = {}
    for g, members in groups.items():
        hit = 1
        for idx in members:
            info = rows[idx]
            if idx not in preds:
                n_missing += 1
                warns.add(info["where"], f"no answer for index {idx} (question counted as a miss)")
                hit = 0
                continue
            text, arow = preds[idx]
            opts = info["options"]
            if not opts and isinstance(arow, Mapping) and isinstance(arow.get("options"), (list, Mapping)):
                opts = _mmb_options(arow, _where(arow, "answer"))
            letter = mmbench_extract(text, opts)
            if letter is None:
                n_unresolved += 1
                hit = 0
            elif letter != info["answer"]:
                hit = 0
        hits[g] = hit

    def group_attr(g: int, key: str) -> str:
        idx = groups[g][0]
        return rows[g][key] if g in rows else rows[idx][key]

    cats: Dict[str, List[int]] = defaultdict(list)
    l2s: Dict[str, List[int]] = defaultdict(list)
    for g, h in hits.items():
        cats[group_attr(g, "category")].append(h)
        l2 = group_attr(g, "l2")
        if l2:
            l2s[l2].append(h)
    metrics: Dict[str, Any] = {
        "task": "mmbench",
        "n_questions": len(groups),
        "n_rows": len(rows),
        "hits": sum(hits.values()),
        "accuracy": _pct(sum(hits.values()), len(groups)),
        "per_category": {c: _pct(sum(v), len(v)) for c, v in sorted(cats.items())},
        "n_unresolved": n_unresolved,
    }
    if l2s:
        metrics["per_l2_category"] = {c: _pct(sum(v), len(v)) for c, v in sorted(l2s.items())}
    return _finish(metrics, warns, n_missing, n_unknown)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------

for _task, _fn in (("vqav2", score_vqav2), ("textvqa", score_textvqa), ("gqa", score_gqa), ("pope", score_pope),
                   ("mme", score_mme), ("scienceqa", score_scienceqa), ("mmbench", score_mmbench)):
    scorers.register(_task, obj=_fn)
del _task, _fn


def score(
    task: str,
    answers: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    strict: bool = False,
) -> Dict[str, Any]:
    """Score ``answers`` against ``annotations`` with the scorer registered for ``task`` (mmkit.registry.scorers)."""
    try:
        fn = scorers.get(task)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    return fn(answers, annotations, strict=strict)
