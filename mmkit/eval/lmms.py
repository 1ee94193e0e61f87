"""lmms-eval adapter: evaluate an mmkit model with ``python -m lmms_eval --model mmkit``.

    pip install lmms-eval                      # mmkit registers itself through the entry point below
    python -m lmms_eval --model mmkit --model_args pretrained=runs/tiny/final,batch_size=8 \\
        --tasks mme,pope --batch_size 1 --log_samples --output_path out/

Registration: the entry-point group ``lmms_eval.models`` (``mmkit = "mmkit.eval.lmms:manifest"`` in
mmkit's pyproject) gives lmms-eval a ``ModelManifest`` with both implementations: the chat one
(:class:`MMKitChatLMM`, ``is_simple = False``, used by default; requests carry ``doc_to_messages``)
and the simple one (:class:`MMKitLMM`, ``is_simple = True``; requests carry a context string and
``doc_to_visual``). Both implement

* ``generate_until(requests) -> list[str]``: batched (``batch_size`` model arg), left-padded,
  greedy unless ``gen_kwargs`` ask for ``temperature > 0``/``do_sample``; ``until`` strings stop
  generation and are cut from the reply; ``max_new_tokens`` defaults to the ``max_new_tokens`` model
  arg (256). ``num_beams > 1`` is not supported (greedy is used, with a warning).
* ``loglikelihood(requests) -> list[(logprob, is_greedy)]``: the context is one user turn of the
  model's template (images prepended as ``<image>\\n``), the continuation is the assistant answer;
  ``logprob`` is the summed log-probability of the continuation's tokens (without the template's
  end-of-turn token) and ``is_greedy`` says whether greedy decoding would produce exactly them.
  This is what ``multiple_choice`` tasks compare across options.

Request layouts (``Instance.args``), as built by lmms-eval 0.7's ``ConfigurableTask`` and
``ConfigurableMessagesTask``:

* simple generate: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``
* chat generate: ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``; older releases
  drop the leading context: ``(doc_to_messages, gen_kwargs, doc_id, task, split)``
* loglikelihood: ``(context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)``, or
  ``(context, continuation)`` for the unconditional half of ``acc_mutual_info``

The document is ``self.task_dict[task][split][doc_id]`` (lmms-eval fills ``task_dict``). Visuals
must be images (PIL images, image paths, or ``{"bytes"|"path"}`` dicts as ``datasets`` gives them);
video and audio raise a clear error.

The module imports without lmms-eval (a minimal stand-in base class is used), so the adapter can
also be driven by hand.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

import mmkit
from mmkit.processing.budget import ImageLimits

log = logging.getLogger("mmkit.eval.lmms")

try:  # the real base class when lmms-eval is installed
    from lmms_eval.api.model import lmms as _LMMBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - exercised only without lmms-eval
    HAVE_LMMS_EVAL = False

    class _NoCache:
        def add_partial(self, attr, req, res) -> None:
            pass

    class _LMMBase:  # type: ignore[no-redef]
        """The attributes of ``lmms_eval.api.model.lmms`` that the adapter relies on."""

        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = _NoCache()
            self.task_dict: dict = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
            return cls(**args)


__all__ = ["MMKitLMM", "MMKitChatLMM", "manifest", "HAVE_LMMS_EVAL"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def manifest():
    """The ``lmms_eval.models`` entry point: ``--model mmkit`` (chat by default, simple on request)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lmms-eval is optional: only when it calls us

    return ModelManifest(model_id="mmkit", simple_class_path="mmkit.eval.lmms.MMKitLMM",
                         chat_class_path="mmkit.eval.lmms.MMKitChatLMM", aliases=("mmkit_chat",))


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def to_image(visual: Any):
    """One lmms-eval visual -> RGB PIL image (videos and audio are rejected with a clear error)."""
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, dict):
        if visual.get("bytes") is not None:
            return ImageLimits().open(visual["bytes"])  # the image budget's defaults, checked before the decode
        if visual.get("path"):
            return to_image(visual["path"])
        if "array" in visual:
            raise ValueError("mmkit's lmms-eval adapter takes images only; this task sends audio")
    if isinstance(visual, (str, os.PathLike)):
        path = str(visual)
        if not path.lower().endswith(IMAGE_EXTS):
            raise ValueError(f"mmkit's lmms-eval adapter takes images only; got {path!r} (a video?)")
        return ImageLimits().open(path)
    raise ValueError(f"mmkit's lmms-eval adapter takes images only; got a {type(visual).__name__}")


class MMKitLMM(_LMMBase):
    """An mmkit model behind lmms-eval's ``lmms`` interface (simple requests; see the module doc)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, model=None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, template: str | None = None,
                 max_new_tokens: int | str = 256, image_placeholder: str = "<image>", **kwargs) -> None:
        super().__init__()
        if kwargs:
            log.warning("mmkit lmms-eval adapter: ignoring unknown model_args %s", sorted(kwargs))
        if model is None:
            if not pretrained:
                raise ValueError("mmkit lmms-eval adapter: give model_args pretrained=DIR (an mmkit, llava-hf or "
                                 "original-LLaVA model directory)")

            model = mmkit.load(pretrained)
            if dtype and dtype != "auto":
                model.to(getattr(torch, str(dtype).replace("torch.", "")))
        if device and str(device) not in ("auto",):
            model.to(device)
        self._model = model.eval()
        try:
            self.batch_size_per_gpu = max(1, int(batch_size))
        except (TypeError, ValueError):  # "auto" and friends
            self.batch_size_per_gpu = 1
        self.template = template or model.template
        self.max_new_tokens = int(max_new_tokens)
        self.image_placeholder = image_placeholder
        self._warned_beams = False

    # ------------------------------------------------------------------ lmms-eval expects these

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._model.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._model.device

    # ------------------------------------------------------------------ helpers

    def _doc(self, task, split, doc_id):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"mmkit lmms-eval adapter: no document {task}/{split}/{doc_id} in task_dict") from None

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [to_image(v) for v in visuals]

    def _with_placeholders(self, context: str, n_images: int) -> str:
        """LLaVA's lmms-eval convention: images go first as ``<image>\\n`` unless the text places them."""
        tok = self._model.processor.image_token
        if self.image_placeholder != tok:
            context = context.replace(self.image_placeholder, tok)
        k = context.count(tok)
        if k == 0 and n_images:
            return (tok + "\n") * n_images + context
        if k != n_images:
            raise ValueError(f"the context has {k} {tok} placeholders but the document has {n_images} images")
        return context

    def _messages(self, messages) -> tuple[list[dict], list]:
        """lmms-eval chat messages (``[{"role", "content": [{"type": "text"|"image", ...}]}]``) -> mmkit."""
        if hasattr(messages, "model_dump"):  # protocol.ChatMessages
            messages = messages.model_dump()["messages"]
        tok = self._model.processor.image_token
        out, images = [], []
        for m in messages:
            if hasattr(m, "model_dump"):
                m = m.model_dump()
            content = m.get("content")
            if isinstance(content, str):
                text = content
            else:
                text = ""
                for part in content or []:
                    if hasattr(part, "model_dump"):
                        part = part.model_dump()
                    kind = part.get("type")
                    if kind == "text":
                        text += ("\n" if text and not text.endswith("\n") else "") + part["text"]
                    elif kind == "image":
                        images.append(to_image(part.get("url", part.get("image"))))
                        text += tok + "\n"
                    else:
                        raise ValueError(f"mmkit's lmms-eval adapter takes text and images only; got a {kind!r} part")
            out.append({"role": m["role"], "content": text})
        return out, images

    def _gen_options(self, gen_kwargs: dict) -> dict:
        gk = dict(gen_kwargs or {})
        until = gk.get("until")
        stop = [until] if isinstance(until, str) else [s for s in (until or []) if s]
        temperature = float(gk.get("temperature") or 0.0)
        do_sample = _as_bool(gk.get("do_sample", temperature > 0)) and temperature > 0
        if int(gk.get("num_beams") or 1) > 1 and not self._warned_beams:
            log.warning("mmkit lmms-eval adapter: num_beams > 1 is not supported; decoding greedily")
            self._warned_beams = True
        opts: dict[str, Any] = {"max_new_tokens": int(gk.get("max_new_tokens") or self.max_new_tokens),
                                "stop": stop or None}
        if do_sample:
            opts.update(temperature=temperature, top_p=gk.get("top_p"), do_sample=True)
        return opts

    # ------------------------------------------------------------------ requests

    def _parse_generate(self, args: tuple) -> tuple[str, list[dict], list, dict]:
        """-> (cache key text, mmkit messages, images, gen_kwargs) for either request layout."""
        if len(args) >= 6 and callable(args[1]) and not isinstance(args[1], dict):  # chat, lmms-eval >= 0.5
            ctx, doc_to_messages, gen_kwargs, doc_id, task, split = args[:6]
        elif len(args) == 5 and callable(args[0]):  # chat, older releases
            doc_to_messages, gen_kwargs, doc_id, task, split = args
            ctx = None
        else:  # simple
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            return ctx, [{"role": "user", "content": self._with_placeholders(ctx, len(images))}], images, gen_kwargs
        messages, images = self._messages(doc_to_messages(self._doc(task, split, doc_id)))
        return ctx if ctx is not None else json.dumps(messages), messages, images, gen_kwargs

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        proc = self._model.processor
        parsed = [self._parse_generate(tuple(r.args)) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, _, _, gk) in enumerate(parsed):
            groups.setdefault(json.dumps(gk, sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mmkit generate_until")
        for idxs in groups.values():
            opts = self._gen_options(parsed[idxs[0]][3])
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                samples = [proc.encode_messages(parsed[i][1], parsed[i][2], self.template) for i in chunk]
                batch = proc.pad(samples, padding_side="left")
                texts = self._model.generate(**batch, return_text=True, **opts)
                for i, text in zip(chunk, texts):
                    results[i] = text.strip()
                    self.cache_hook.add_partial("generate_until", (parsed[i][0], parsed[i][3]), results[i])
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmkit's lmms-eval adapter does not implement generate_until_multi_round")

    def _parse_loglikelihood(self, args: tuple) -> tuple[str, str, list]:
        if len(args) == 2:  # acc_mutual_info's unconditional requests
            return args[0], args[1], []
        ctx, target, doc_to_visual, doc_id, task, split = args[:6]
        cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
        if isinstance(cont, (list, tuple)):
            cont = cont[0]
        images = self._visuals(doc_to_visual, task, split, doc_id)
        return self._with_placeholders(ctx, len(images)), str(cont), images

    def _continuation_tokens(self, answer_ids: Sequence[int], continuation: str) -> int:
        """How many of the answer ids (continuation + end-of-turn) belong to the continuation."""
        tok = self._model.tokenizer
        target = continuation.strip()
        for n in range(1, len(answer_ids) + 1):
            if tok.decode(list(answer_ids[:n]), skip_special_tokens=False).strip() == target:
                return n
        # unknown words decode to <unk>: fall back to the continuation's own token count
        m = len(tok(target, add_special_tokens=False)["input_ids"])
        return min(max(m, 1), len(answer_ids))

    def _encode_pair(self, context: str, continuation: str, images: list) -> tuple[dict, int, int]:
        """-> (model sample of context + continuation, where the continuation starts, its token count)."""
        proc = self._model.processor
        ctx = proc.encode_messages([{"role": "user", "content": context}], images, self.template)
        full = proc.encode_conversation([{"from": "human", "value": context},
                                         {"from": "gpt", "value": continuation.strip()}], images, self.template,
                                        max_length=1 << 30)
        ids, n_ctx = list(full["input_ids"]), len(ctx["input_ids"])
        if ids[:n_ctx] != list(ctx["input_ids"]):
            raise RuntimeError("mmkit lmms-eval adapter: the prompt ids differ between generation and scoring "
                               f"(template {self.template!r})")
        n_cont = self._continuation_tokens(ids[n_ctx:], continuation)
        sample = {"input_ids": ids[:n_ctx + n_cont], "pixel_values": ctx["pixel_values"],
                  "image_sizes": ctx["image_sizes"]}
        return sample, n_ctx, n_cont

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        proc = self._model.processor
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mmkit loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(requests))))
            samples, spans, keys = [], [], []
            for i in chunk:
                context, cont, images = self._parse_loglikelihood(tuple(requests[i].args))
                keys.append((context, cont))
                if not cont.strip():
                    samples.append(None)
                    spans.append(None)
                    continue
                sample, n_ctx, n_cont = self._encode_pair(context, cont, images)
                samples.append(sample)
                spans.append((n_ctx, n_cont))
            real = [s for s in samples if s is not None]
            logits = None
            if real:
                batch = proc.pad(real, padding_side="right")
                logits = self._model(**batch).logits.float()
            row = 0
            for i, s, span, key in zip(chunk, samples, spans, keys):
                if s is None:  # an empty continuation has probability 1
                    results[i] = (0.0, True)
                else:
                    n_ctx, n_cont = span
                    target = torch.tensor(s["input_ids"][n_ctx:n_ctx + n_cont], device=logits.device)
                    pred = logits[row, n_ctx - 1:n_ctx - 1 + n_cont]
                    logprobs = torch.log_softmax(pred, dim=-1).gather(-1, target[:, None]).squeeze(-1)
                    results[i] = (float(logprobs.sum()), bool((pred.argmax(-1) == target).all()))
                    row += 1
                self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


class MMKitChatLMM(MMKitLMM):
    """The chat flavour (``is_simple = False``): requests carry ``doc_to_messages``."""

    is_simple = False
