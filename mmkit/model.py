"""VisionLanguageModel: vision encoder -> connector -> merge at image-token positions -> LLM.

The processor has already expanded every ``<image>`` placeholder into as many image-token ids
as that image produces, so the forward pass is a row-by-row splice (one dispatch point,
``mmkit_kernels.merge_image_features``) followed by the LLM. Labels at image positions are
always ignored, whatever the caller passed. ``attention_mask`` is the usual 2D padding mask, or a
4D ``[B, 1, T, T]`` mask prepared for the LLM's attention implementation (packed rows, with
``position_ids``), which is passed to the LLM as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.compat import llm_cache_kwargs, output_cache
from mmkit.connectors.anyres import pack_image_features, pack_video_features
from mmkit.processing.processor import MultimodalProcessor
from mmkit.registry import llms
from mmkit_kernels import fused_linear_cross_entropy, merge_image_features

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    loss: torch.Tensor | None = None  # mean over supervised tokens (or their sum, see ``loss_reduction``)
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    num_supervised: int = 0

    def __getitem__(self, key: str):
        return getattr(self, key)


class VisionLanguageModel(nn.Module):
    """One model composed of swappable parts: ``vision``, ``connector``, ``llm``."""

    def __init__(self, recipe, vision: nn.Module, connector: nn.Module, llm: nn.Module, tokenizer=None,
                 image_token_id: int | None = None, *, image_spec):
        super().__init__()
        self.recipe = recipe
        # the image parameters, derived once from recipe.model.image and the encoder (mmkit.processing.spec)
        self.image_spec = image_spec
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        cfg = recipe.model
        if image_token_id is None:
            image_token_id = cfg.image_token_id
        if image_token_id is None and tokenizer is not None:
            image_token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
        if image_token_id is None:
            raise ValueError("model.image_token_id is not set and there is no tokenizer to look up model.image_token")
        self.image_token_id = int(image_token_id)
        self.video_token_id = cfg.video_token_id
        if image_spec.newline:
            hidden = llm.config.get_text_config().hidden_size
            self.image_newline = nn.Parameter(torch.randn(hidden) / hidden**0.5)
        else:
            self.image_newline = None
        for p in vision.dead_parameters():
            p.requires_grad_(False)
        self._processor = None

    # ------------------------------------------------------------------ parts

    @property
    def processor(self):
        """Turns images and text into model inputs (see ``mmkit.processing.processor``)."""
        if self._processor is None:
            self._processor = MultimodalProcessor.for_model(self)
        return self._processor

    @property
    def template(self) -> str:
        return self.recipe.model.template or llms.get(self.recipe.model.llm.name).default_template

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def summary(self) -> dict:
        """Parameter counts per part (total / trainable)."""
        out = {}
        for name, part in self.parts().items():
            params = list(part.parameters())
            out[name] = {
                "params": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        if self.image_newline is not None:
            out["connector"]["params"] += self.image_newline.numel()
        return out

    # ------------------------------------------------------------------ images

    def encode_images(self, pixel_values, image_sizes: Sequence | None = None) -> torch.Tensor:
        """Pixel views -> image-token features [total_tokens, llm_hidden], images in order.

        ``pixel_values`` is a list with one [views, 3, S, S] tensor per image, or one
        [images, 3, S, S] tensor (one view per image).
        """
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.dim() == 5:
                pixel_values = list(pixel_values)
            else:
                pixel_values = [v.unsqueeze(0) for v in pixel_values]
        if len(pixel_values) == 0:
            return self.connector_output_empty()
        views_per_image = [v.shape[0] for v in pixel_values]
        views = torch.cat(list(pixel_values), dim=0).to(self.device)
        features = self.connector(self.vision(views))  # [views, P*P, D]
        features = features.to(self.dtype)
        spec = self.image_spec
        per_image = torch.split(features, views_per_image, dim=0)
        if spec.merge == "flat":
            return torch.cat([f.reshape(-1, f.shape[-1]) for f in per_image], dim=0)

        if image_sizes is None:
            raise ValueError(f"image_sizes are required for {spec.merge} merging")
        packed = [pack_image_features(f, tuple(size), spec, self.image_newline)
                  for f, size in zip(per_image, image_sizes)]
        return torch.cat(packed, dim=0)

    def encode_videos(self, pixel_values_videos) -> torch.Tensor:
        """Video frames (one [frames, 3, S, S] tensor per video) -> pooled features, one newline per video."""
        out = []
        for frames in pixel_values_videos:
            feats = self.connector(self.vision(frames.to(self.device))).to(self.dtype)
            out.append(pack_video_features(feats, self.image_newline))
        return torch.cat(out, dim=0) if out else self.connector_output_empty()

    def connector_output_empty(self) -> torch.Tensor:
        return torch.zeros(0, self.llm.get_input_embeddings().weight.shape[1], device=self.device, dtype=self.dtype)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features spliced in at image-token positions."""
        table = self.llm.get_input_embeddings()
        if type(table) is nn.Embedding:
            return merge_image_features(input_ids, table.weight, image_features, self.image_token_id)
        # embeddings with extra behaviour (scaling, ...): embed first, then splice
        is_img = input_ids == self.image_token_id
        embeds = table(torch.where(is_img, torch.zeros_like(input_ids), input_ids))
        if image_features is not None and image_features.shape[0]:
            embeds = self.splice(embeds, input_ids, image_features, self.image_token_id, "image")
        return embeds

    @staticmethod
    def splice(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, token_id: int | None,
               what: str) -> torch.Tensor:
        """Write ``features`` over the rows of ``embeds`` whose id is ``token_id``, in order."""
        if token_id is None:
            raise ValueError(f"this model has no {what} token (model.{what}_token_id is not set)")
        is_tok = (input_ids == token_id).reshape(-1)
        n = int(is_tok.sum())
        if n != features.shape[0]:
            raise ValueError(f"{what} features and {what} tokens do not match: {n} placeholders, "
                             f"{features.shape[0]} feature rows")
        flat = embeds.reshape(-1, embeds.shape[-1])
        flat = flat.index_copy(0, is_tok.nonzero().squeeze(1), features.to(flat.dtype))
        return flat.reshape(embeds.shape)

    # ------------------------------------------------------------------ forward

    def _plain_head(self) -> bool:
        cfg = self.llm.config.get_text_config()
        head = self.llm.get_output_embeddings()
        return (
            isinstance(head, nn.Linear)
            and head.bias is None
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        image_sizes=None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        pixel_values_videos=None,
        video_features: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
        **llm_kwargs,
    ) -> VLMOutput:
        """``loss_reduction``: ``mean`` (over the supervised tokens), ``sum``, ``sequence``: a ``[rows]`` tensor,
        each row's sum of its supervised tokens' losses (minus its log-probability; no logits are returned), or
        ``token``: the ``[rows, T]`` shifted per-position losses (position ``t`` holds the loss of token ``t+1``, 0
        where unsupervised; packed rows, whose sequences are summed by the caller)."""
        input_ids = input_ids.to(self.device)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        if video_features is None and pixel_values_videos is not None:
            video_features = self.encode_videos(pixel_values_videos)
        inputs_embeds = self.embed(input_ids, image_features)
        if video_features is not None:
            inputs_embeds = self.splice(inputs_embeds, input_ids, video_features, self.video_token_id, "video")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        common = dict(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **llm_cache_kwargs(past_key_values), **llm_kwargs,
        )
        if labels is None:
            out = self.llm(**common)
            return VLMOutput(logits=out.logits, past_key_values=output_cache(out))

        labels = labels.to(self.device).masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        if self.video_token_id is not None:
            labels = labels.masked_fill(input_ids == self.video_token_id, IGNORE_INDEX)
        if attention_mask is not None and attention_mask.dim() == 2:
            # a 4D mask (packed rows) relates query to key positions; its caller has masked the padding labels
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        n_supervised = int((shift_labels != IGNORE_INDEX).sum())
        if loss_reduction in ("sequence", "token"):  # per-row or per-position token losses (preference objectives)
            out = self.llm.get_decoder()(**common) if self._plain_head() else self.llm(**common)
            loss = sequence_nll(out, self.llm.get_output_embeddings() if self._plain_head() else None, shift_labels,
                                per_token=loss_reduction == "token")
            return VLMOutput(loss=loss, past_key_values=output_cache(out), num_supervised=n_supervised)
        if self._plain_head():
            out = self.llm.get_decoder()(**common)
            hidden = out.last_hidden_state
            head = self.llm.get_output_embeddings()
            loss = lm_head_loss(hidden, head.weight, shift_labels, reduction=loss_reduction)
            logits = head(hidden) if return_logits else None
        else:
            out = self.llm(**common)
            logits = out.logits
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            if loss_reduction == "mean":
                loss = loss / max(n_supervised, 1)
        return VLMOutput(loss=loss, logits=logits, past_key_values=output_cache(out),
                         num_supervised=n_supervised)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, **kwargs):
        """Greedy by default; see ``mmkit.infer.generate.generate`` for the options."""
        # delegate to the layer above, imported on call (ARCHITECTURE.md: the one exception)
        from mmkit.infer.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        image_sizes=image_sizes, **kwargs)

    def chat(self, image, text: str, history=None, **kwargs):
        """One multi-turn chat step; pass the returned history back for the next turn."""
        # delegate to the layer above, imported on call (ARCHITECTURE.md: the one exception)
        from mmkit.infer.chat import chat

        return chat(self, image, text, history=history, **kwargs)

    # ------------------------------------------------------------------ saving

    def save(self, out_dir: str | Path, format: str = "mmkit", overwrite: bool = False) -> Path:
        """Write the model: ``mmkit`` (safetensors + recipe + tokenizer) or ``llava-hf``. An existing non-empty
        ``out_dir`` is refused, unless it is a previous mmkit save and ``overwrite=True``."""
        if format == "mmkit":
            # delegate to the layer above, imported on call (ARCHITECTURE.md: the one exception)
            from mmkit.formats.native import save_mmkit

            return save_mmkit(self, out_dir, overwrite=overwrite)
        if format in ("llava-hf", "llava_hf", "hf"):
            # delegate to the layer above, imported on call (ARCHITECTURE.md: the one exception)
            from mmkit.formats.llava_hf import save_llava_hf

            return save_llava_hf(self, out_dir, overwrite=overwrite)
        raise ValueError(f"unknown save format {format!r}; choices: mmkit, llava-hf")


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, shift_labels: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the LM head on supervised rows only (the logits of other rows are never made)."""
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction=reduction)


def sequence_nll(out, head: nn.Module | None, shift_labels: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Per-row sums of the next-token losses of the supervised positions: ``[rows]``, fp32 (``per_token``: the
    losses themselves, ``[rows, T]``, 0 elsewhere). With ``head`` (a plain linear LM head) ``out`` is the decoder's
    output and the logits are made for the supervised positions only; otherwise ``out.logits`` are the LLM's."""
    mask = shift_labels != IGNORE_INDEX
    where = mask.nonzero()
    rows = where[:, 0]
    if head is not None:
        logits = head(out.last_hidden_state[mask])
    else:
        logits = out.logits[mask]
    nll = F.cross_entropy(logits.float(), shift_labels[mask], reduction="none")
    if per_token:
        return torch.zeros(shift_labels.shape, device=nll.device, dtype=nll.dtype).index_put((rows, where[:, 1]), nll)
    return torch.zeros(shift_labels.shape[0], device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
