"""LLM backbones: any transformers ``AutoModelForCausalLM``, with presets for the LLaVA families.

A preset fixes what differs between families: the expected ``model_type``, the default
conversation template, and the pad-token convention (LLaVA pads Llama/Vicuna/Mistral with
``<unk>``; Qwen2 uses ``<|endoftext|>``). ``auto`` accepts any causal LM with no defaults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mmkit.hub import from_pretrained
from mmkit.recipe import RecipeError, check_known_fields
from mmkit.registry import UnknownNameError, llms, tokenizers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMPreset:
    name: str
    model_type: str | None  # transformers model_type for random init and the sanity check; None = any
    default_template: str
    pad_candidates: tuple[str, ...]  # first token present in the vocabulary becomes the pad token

    def build_model(self, cfg) -> nn.Module:
        if cfg.pretrained:
            kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
            model = from_pretrained(AutoModelForCausalLM.from_pretrained, cfg.pretrained, "LLM", "model.llm.pretrained", **kwargs)
        else:
            config = dict(cfg.config)
            model_type = config.pop("model_type", self.model_type)
            if model_type is None:
                raise ValueError(f"model.llm.config.model_type is required for the {self.name!r} preset")
            check_known_fields(AutoConfig.for_model(model_type), config, "model.llm.config", f"a {model_type} config")
            config = AutoConfig.for_model(model_type, **config)
            if cfg.attn_implementation:
                config._attn_implementation = cfg.attn_implementation
            model = AutoModelForCausalLM.from_config(config)
        got = model.config.model_type
        if self.model_type is not None and got != self.model_type:
            log.warning("model.llm.name=%s expects model_type %r but the checkpoint is %r", self.name, self.model_type, got)
        return model

    def build_tokenizer(self, cfg, image_token: str) -> PreTrainedTokenizerBase | None:
        source = cfg.tokenizer or cfg.pretrained
        if source is None:
            return None
        if source.startswith("builtin:"):  # a tokenizer registered in mmkit.registry.tokenizers (mmkit.tokenizers)
            try:
                make = tokenizers.get(source.split(":", 1)[1])
            except UnknownNameError as exc:
                raise RecipeError(f"model.llm.tokenizer: {exc}") from None
            tok = make()
        else:
            tok = from_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer", "model.llm.tokenizer")
        return self.prepare_tokenizer(tok, image_token)

    def prepare_tokenizer(self, tok: PreTrainedTokenizerBase, image_token: str) -> PreTrainedTokenizerBase:
        if image_token not in tok.get_vocab():
            tok.add_tokens([image_token], special_tokens=True)
        if tok.pad_token is None:
            vocab = tok.get_vocab()
            for cand in self.pad_candidates:
                token = getattr(tok, cand, None) if cand.endswith("_token") else cand
                if token is not None and token in vocab:
                    tok.pad_token = token
                    break
        return tok


PRESETS = {
    "llama": LLMPreset("llama", "llama", "vicuna_v1", ("unk_token", "eos_token")),
    "mistral": LLMPreset("mistral", "mistral", "mistral_instruct", ("unk_token", "eos_token")),
    "qwen2": LLMPreset("qwen2", "qwen2", "qwen_2", ("<|endoftext|>", "eos_token")),
    "auto": LLMPreset("auto", None, "vicuna_v1", ("pad_token", "unk_token", "eos_token")),
}

llms.register("llama", aliases=("vicuna", "llama2"), obj=PRESETS["llama"])
llms.register("mistral", obj=PRESETS["mistral"])
llms.register("qwen2", aliases=("qwen",), obj=PRESETS["qwen2"])
llms.register("auto", obj=PRESETS["auto"])

__all__ = ["LLMPreset", "PRESETS"]
