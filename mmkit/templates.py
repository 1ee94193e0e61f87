"""Conversation templates: render a chat as a list of segments, each supervised or not.

A template never produces "one string to be split later". It renders a conversation as an
ordered list of :class:`Segment` s -- ``(text, supervised, turn)`` -- whose texts concatenate to the
exact prompt string of the reference implementation (original LLaVA ``conversation.py`` /
LLaVA-NeXT's ``llava/conversation.py``). Supervision is decided per segment:
the assistant answer plus the template's end-of-turn text is the only supervised segment of a
turn; the system prompt, user turns and role headers never are. ``mmkit.processing.text``
tokenizes segment by segment, so the label mask cannot drift from the ids.

Templates (registry ``mmkit.registry.templates``; aliases in brackets):

=====================  ==========================================================  ===================
name                   rendering of one exchange (``S`` system, ``Q`` user, ``A``)  supervised
=====================  ==========================================================  ===================
``plain``              ``<image>`` + ``A`` + ``"\\n"`` (user text discarded)         ``A + "\\n"``
``vicuna_v1`` [v1]     ``S USER: Q ASSISTANT: A</s>``                               ``A + "</s>"``
``llava_v1``           same, "curious human" system prompt                          ``A + "</s>"``
``mistral_instruct``   ``[INST] Q [/INST] A </s>``                                  ``A + " </s>"``
``chatml_direct``      ``<|im_start|>system\\nS<|im_end|><|im_start|>user\\nQ...``   ``A + "<|im_end|>"``
  [mistral_direct]
``qwen_2`` [qwen_1_5]  ``<|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\n...``  ``A + "<|im_end|>"``
``llama_3``            ``<|begin_of_text|><|start_header_id|>system...<|eot_id|>``    ``A + "<|eot_id|>"``
  [llava_llama_3]
``tokenizer``          the tokenizer's own ``chat_template`` (apply_chat_template)    ``A`` + the first
                                                                                    special token after it
=====================  ==========================================================  ===================

Differences from the references, on purpose:

* An empty system prompt (``{"role": "system", "content": ""}``) drops the system block entirely
  (orig vicuna would emit a lone leading ``" "``).
* The original LLaVA-NeXT qwen/llama-3 preprocessors also supervise the assistant header and every
  ``<|im_start|>``/``<|im_end|>``/newline token; mmkit supervises the answer and its end-of-turn token only.
* ``plain`` at inference renders only the image placeholders (the user text is discarded in
  training, so the prompt matches what the model was trained on).
* A user turn with exactly one ``<image>`` is normalized as in the original ``preprocess_multimodal``
  (remove it, strip, prepend ``"<image>\\n"``); turns with several images keep them in place
  (the original would collapse them into one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mmkit.registry import templates as _registry

__all__ = [
    "ConversationError",
    "Segment",
    "Template",
    "get_template",
    "normalize_conversation",
    "render_prompt",
    "stop_strings",
    "stop_token_ids",
    "DEFAULT_IMAGE_TOKEN",
]

DEFAULT_IMAGE_TOKEN = "<image>"

_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class ConversationError(ValueError):
    """A conversation that cannot be rendered or tokenized (bad roles, empty answer, too long, ...)."""


class Segment(NamedTuple):
    """One piece of a rendered conversation.

    ``turn`` is the index of the (non-system) message the text belongs to; ``-1`` for the system
    prompt. Exchange ``k`` (user turn + assistant answer) is made of turns ``2k`` and ``2k+1``.
    """

    text: str
    supervised: bool
    turn: int


# --------------------------------------------------------------------------------------------
# conversation normalization
# --------------------------------------------------------------------------------------------


def _move_image_to_front(text: str, image_token: str) -> str:
    """preprocess_multimodal: a turn with one image becomes ``"<image>\\n" + rest.strip()``."""
    if text.count(image_token) != 1:
        return text
    return image_token + "\n" + text.replace(image_token, "").strip()


def normalize_conversation(
    conversation: Sequence[Mapping[str, Any]],
    *,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    training: bool = False,
    allow_empty_answers: bool = False,
) -> tuple[str | None, list[dict[str, str]]]:
    """Validate a chat and return ``(system or None, [{"role", "content"}, ...])``.

    Accepts LLaVA turns (``{"from": "human"|"gpt"|"system", "value": str}``) and chat messages
    (``{"role": "user"|"assistant"|"system", "content": str}``). A system message is allowed only
    first. After it, roles must alternate user, assistant, user, ...

    ``training=True`` (a dataset sample): a leading assistant turn is dropped as in the original
    ``preprocess`` (``source[1:]``); the conversation must end with an assistant answer, and no
    answer may be empty. ``training=False`` (a prompt): the chat must end with a user turn.
    """
    # (type checks first: isinstance against an ABC costs more, once per turn of every sample)
    if type(conversation) is not list and (not isinstance(conversation, Sequence)
                                           or isinstance(conversation, (str, bytes))):
        raise ConversationError(f"a conversation must be a list of turns, got {type(conversation).__name__}")
    msgs: list[dict[str, str]] = []
    for i, turn in enumerate(conversation):
        if type(turn) is not dict and not isinstance(turn, Mapping):
            raise ConversationError(f"turn {i}: expected a dict, got {type(turn).__name__}")
        raw_role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        role = _ROLE_MAP.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ConversationError(
                f"turn {i}: unknown role {raw_role!r}; expected one of human, gpt, user, assistant, system"
            )
        if not isinstance(content, str):
            raise ConversationError(f"turn {i} ({role}): content must be a string, got {type(content).__name__}")
        msgs.append({"role": role, "content": content})

    system = None
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            raise ConversationError(f"turn {i + (system is not None)}: a system message is only allowed first")
    if training and msgs and msgs[0]["role"] == "assistant":
        msgs = msgs[1:]  # the original drops a first turn that is not from the human
    if not msgs:
        raise ConversationError("the conversation has no user turn")
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(
                f"roles must alternate user/assistant starting with user; turn {i} is {m['role']!r}, "
                f"expected {expected!r} (roles: {[x['role'] for x in msgs]})"
            )
    if training:
        if msgs[-1]["role"] != "assistant":
            raise ConversationError("a training conversation must end with an assistant answer")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip() and not allow_empty_answers:
                raise ConversationError(f"turn {i}: empty assistant answer")
    for m in msgs:
        if m["role"] == "user":
            m["content"] = _move_image_to_front(m["content"], image_token)
    return system, msgs


# --------------------------------------------------------------------------------------------
# the template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A conversation template described by format strings.

    One exchange renders as (``{...}`` are ``str.format`` fields)::

        [bos_text] [system_format]  user_format  assistant_header  ANSWER answer_suffix  after_answer
                    (first only)                 \\______________ unsupervised ___/ \\_ supervised _/ \\ unsup. /

    ``system_in_first_user``: the formatted system text is prepended to the first user content
    (Llama-2 style ``<<SYS>>`` inside ``[INST]``). ``user_text=False`` (``plain``): the user text is
    replaced by its image placeholders. ``trim=True`` strips every message (Llama-3 chat template).
    ``use_chat_template=True``: render with the tokenizer's own chat template instead.
    The inference prompt is the rendered history plus ``generation_prompt``
    (``assistant_header`` without trailing spaces: ``"ASSISTANT:"``, ``""`` for mistral).
    """

    name: str
    default_system: str | None = None
    system_format: str = "{system}"
    system_in_first_user: bool = False
    user_format: str = "{content}"
    assistant_header: str = ""
    answer_suffix: str = ""
    after_answer: str = ""
    bos_text: str = ""
    eot_token: str | None = None
    stop_strings: tuple[str, ...] = ()
    user_text: bool = True
    trim: bool = False
    max_exchanges: int | None = None
    use_chat_template: bool = False

    @property
    def generation_prompt(self) -> str:
        """What follows the history when the assistant is to speak (``"ASSISTANT:"``, ...)."""
        return self.assistant_header.rstrip(" ")

    def replace(self, **changes: Any) -> "Template":
        """A copy with some fields changed (e.g. another ``default_system``)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- rendering

    def segments(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tokenizer: Any = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        training: bool = True,
        allow_empty_answers: bool = False,
    ) -> list[Segment]:
        """Render a conversation into segments; texts concatenate to the full prompt string.

        With ``training=True`` the chat must end with an assistant answer (see
        :func:`normalize_conversation`); with ``training=False`` it must end with a user turn and
        no generation slot is added (use :func:`render_prompt` / ``generation_prompt``).
        """
        system, msgs = normalize_conversation(messages, image_token=image_token, training=training,
                                              allow_empty_answers=allow_empty_answers)
        if not training and msgs[-1]["role"] != "user":
            raise ConversationError("a prompt must end with a user turn (nothing to generate after an answer)")
        if self.max_exchanges is not None and (len(msgs) + 1) // 2 > self.max_exchanges:
            raise ConversationError(
                f"template {self.name!r} takes at most {self.max_exchanges} exchange(s), got {(len(msgs) + 1) // 2}"
            )
        if self.use_chat_template:
            return _chat_template_segments(tokenizer, system, msgs)
        return self._format_segments(system, msgs, image_token)

    def _system_text(self, system: str | None) -> str:
        if system is None:
            system = self.default_system or ""
        if self.trim:
            system = system.strip()
        return self.system_format.format(system=system) if system else ""

    def _format_segments(self, system: str | None, msgs: list[dict[str, str]], image_token: str) -> list[Segment]:
        segs: list[Segment] = []
        sys_text = self._system_text(system)
        lead = self.bos_text
        if sys_text and not self.system_in_first_user:
            segs.append(Segment(lead + sys_text, False, -1))
            lead = ""
        for i, m in enumerate(msgs):
            content = m["content"].strip() if self.trim else m["content"]
            if m["role"] == "user":
                if not self.user_text:
                    content = image_token * content.count(image_token)
                if i == 0 and self.system_in_first_user:
                    content = sys_text + content
                segs.append(Segment(lead + self.user_format.format(content=content), False, i))
                lead = ""
            else:
                if self.assistant_header:
                    segs.append(Segment(self.assistant_header, False, i))
                segs.append(Segment(content + self.answer_suffix, True, i))
                if self.after_answer:
                    segs.append(Segment(self.after_answer, False, i))
        return segs

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tokenizer: Any = None, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
        """Same as :func:`render_prompt`."""
        return render_prompt(self, messages, add_generation_prompt=add_generation_prompt,
                             tokenizer=tokenizer, image_token=image_token)

    # ---------------------------------------------------------------- stopping

    def get_stop_strings(self, tokenizer: Any = None) -> list[str]:
        """Strings that end an assistant turn (for the ``tokenizer`` template: found by probing)."""
        out = list(self.stop_strings)
        if self.use_chat_template:
            if tokenizer is None:
                raise ConversationError("the 'tokenizer' template needs a tokenizer to know its stop strings")
            eot = _probe_chat_template_eot(tokenizer)
            if eot:
                out.append(eot)
        if tokenizer is not None and getattr(tokenizer, "eos_token", None) and tokenizer.eos_token not in out:
            out.append(tokenizer.eos_token)
        return out

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end generation: stop strings that are single tokens, plus the eos id."""
        ids: list[int] = []
        for s in self.get_stop_strings(tokenizer):
            enc = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids


def get_template(template: "str | Template") -> Template:
    """A registered template by name (or alias), or the Template itself."""
    if isinstance(template, Template):
        return template
    return _registry.get(template)


def render_prompt(
    template: "str | Template",
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tokenizer: Any = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> str:
    """Render chat ``messages`` (``[{"role", "content"}]``) as the template's prompt string.

    With ``add_generation_prompt`` the chat must end with a user turn and the assistant slot is
    opened (``"... ASSISTANT:"``); without it, the chat is rendered as is (complete answers).
    The ``tokenizer`` template needs ``tokenizer=``.
    """
    tpl = get_template(template)
    system, msgs = normalize_conversation(messages, image_token=image_token)
    if add_generation_prompt and msgs[-1]["role"] != "user":
        raise ConversationError("add_generation_prompt=True needs a chat that ends with a user turn")
    if tpl.max_exchanges is not None and (len(msgs) + 1) // 2 > tpl.max_exchanges:
        raise ConversationError(f"template {tpl.name!r} takes at most {tpl.max_exchanges} exchange(s)")
    if tpl.use_chat_template:
        conv = ([{"role": "system", "content": system}] if system is not None else []) + msgs
        return _apply_chat_template(tokenizer, conv, add_generation_prompt)
    # an answer-less tail (the prompt) renders like a complete chat minus the open slot
    text = "".join(s.text for s in tpl._format_segments(system, msgs, image_token))
    if add_generation_prompt:
        text += tpl.generation_prompt
    return text


def stop_strings(template: "str | Template", tokenizer: Any = None) -> list[str]:
    """Module-level shortcut for ``Template.get_stop_strings``."""
    return get_template(template).get_stop_strings(tokenizer)


def stop_token_ids(template: "str | Template", tokenizer: Any) -> list[int]:
    """Module-level shortcut for ``Template.stop_token_ids``."""
    return get_template(template).stop_token_ids(tokenizer)


# --------------------------------------------------------------------------------------------
# the `tokenizer` template: segments from the tokenizer's chat_template, rendered incrementally
# --------------------------------------------------------------------------------------------


def _apply_chat_template(tokenizer: Any, conv: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if tokenizer is None:
        raise ConversationError("the 'tokenizer' template needs a tokenizer (tokenizer=...)")
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(f"{type(tokenizer).__name__} has no chat_template; pick a named template instead")
    out = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise ConversationError(f"apply_chat_template returned {type(out).__name__}, expected a string")
    return out


def _special_strings(tokenizer: Any) -> list[str]:
    found: set[str] = set()
    for tok in getattr(tokenizer, "all_special_tokens", None) or []:
        if tok:
            found.add(str(tok))
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False) and str(tok):
            found.add(str(tok))
    return sorted(found, key=len, reverse=True)


def _split_answer_tail(tokenizer: Any, rest: str) -> tuple[str, str]:
    """Split the text after an answer into (end-of-turn part up to the first special token, rest)."""
    best = None
    for s in _special_strings(tokenizer):
        pos = rest.find(s)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(s) > len(best[1]))):
            best = (pos, s)
    if best is None:
        return "", rest
    end = best[0] + len(best[1])
    return rest[:end], rest[end:]


def _probe_chat_template_eot(tokenizer: Any) -> str:
    """The end-of-turn text the chat template writes after an assistant answer ('' if none)."""
    segs = _chat_template_segments(tokenizer, None, [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    answer = [s.text for s in segs if s.supervised][0]
    return answer[len("ok"):].strip()


def _chat_template_segments(tokenizer: Any, system: str | None, msgs: list[dict[str, str]]) -> list[Segment]:
    """Segments from a chat template by rendering growing prefixes of the chat and diffing them.

    Needs a prefix-stable template (rendering k messages is a prefix of rendering k+1); templates
    that rewrite earlier turns (e.g. strip reasoning from past answers) raise ConversationError.
    """
    head = [{"role": "system", "content": system}] if system is not None else []
    segs: list[Segment] = []
    prev = ""

    def unstable(what: str) -> ConversationError:
        return ConversationError(
            f"the tokenizer's chat template is not prefix-stable ({what}); "
            "it cannot be split into turns - pick a named template instead"
        )

    for i, m in enumerate(msgs):
        upto = head + msgs[: i + 1]
        if m["role"] == "user":
            cur = _apply_chat_template(tokenizer, upto, False)
            if not cur.startswith(prev):
                raise unstable(f"turn {i}")
            segs.append(Segment(cur[len(prev):], False, i))
            prev = cur
            continue
        opened = _apply_chat_template(tokenizer, head + msgs[:i], True)
        full = _apply_chat_template(tokenizer, upto, False)
        if not opened.startswith(prev) or not full.startswith(opened):
            raise unstable(f"turn {i}")
        header, body = opened[len(prev):], full[len(opened):]
        content = m["content"]
        pos = body.find(content)
        if pos < 0 and content.strip():
            content = content.strip()
            pos = body.find(content)
        if pos < 0:
            raise ConversationError(f"turn {i}: the chat template does not reproduce the assistant answer verbatim")
        eot, after = _split_answer_tail(tokenizer, body[pos + len(content):])
        if header + body[:pos]:
            segs.append(Segment(header + body[:pos], False, i))
        segs.append(Segment(content + eot, True, i))
        if after:
            segs.append(Segment(after, False, i))
        prev = full
    return segs


# --------------------------------------------------------------------------------------------
# registrations
# --------------------------------------------------------------------------------------------

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def _register(tpl: Template, aliases: Iterable[str] = ()) -> Template:
    _registry.register(tpl.name, aliases=tuple(aliases), obj=tpl)
    return tpl


PLAIN = _register(Template(
    name="plain", default_system="", system_format="", user_text=False,
    answer_suffix="\n", stop_strings=("\n",), max_exchanges=1,
))
VICUNA_V1 = _register(Template(
    name="vicuna_v1", default_system=VICUNA_SYSTEM, system_format="{system} ",
    user_format="USER: {content} ", assistant_header="ASSISTANT: ", answer_suffix="</s>",
    eot_token="</s>", stop_strings=("</s>",),
), aliases=("v1",))
LLAVA_V1 = _register(VICUNA_V1.replace(name="llava_v1", default_system=LLAVA_V1_SYSTEM))
MISTRAL_INSTRUCT = _register(Template(
    name="mistral_instruct", default_system="", system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_first_user=True, user_format="[INST] {content} [/INST]", assistant_header=" ",
    answer_suffix=" </s>", eot_token="</s>", stop_strings=("</s>",),
))
CHATML_DIRECT = _register(Template(
    name="chatml_direct", default_system="Answer the questions.",
    system_format="<|im_start|>system\n{system}<|im_end|>",
    user_format="<|im_start|>user\n{content}<|im_end|>", assistant_header="<|im_start|>assistant\n",
    answer_suffix="<|im_end|>", eot_token="<|im_end|>", stop_strings=("<|im_end|>",),
), aliases=("mistral_direct",))
QWEN_2 = _register(Template(
    name="qwen_2", default_system="You are a helpful assistant.",
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n", assistant_header="<|im_start|>assistant\n",
    answer_suffix="<|im_end|>", after_answer="\n", eot_token="<|im_end|>", stop_strings=("<|im_end|>",),
), aliases=("qwen_1_5",))
LLAMA_3 = _register(Template(
    name="llama_3", default_system=LLAVA_LLAMA_SYSTEM, bos_text="<|begin_of_text|>",
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    answer_suffix="<|eot_id|>", eot_token="<|eot_id|>", stop_strings=("<|eot_id|>",), trim=True,
), aliases=("llava_llama_3",))
TOKENIZER = _register(Template(name="tokenizer", use_chat_template=True))
