"""Weight quantization of the LLM for inference (bitsandbytes 4-bit NF4 or LLM.int8).

    from mmkit.quant import quantize_llm
    report = quantize_llm(model, "4bit")     # model.llm's nn.Linear layers except lm_head
    print(report)                             # bytes before / after

Only the LLM's linear layers are quantized; the vision tower, the connector, the embeddings and
the LM head keep their dtype. The 4-bit compute dtype is bfloat16 (never float16 on CPU: many CPU
kernels have no fp16 path and LLaVA's hard-coded fp16 is a known crash there).

On CPU this is a **memory** tool, not a speed tool: a quantized layer is several times slower than a
bf16 one (bitsandbytes dequantizes on the fly), but a 7B LLM needs ~3.9 GB in NF4 instead of
~13.5 GB in bf16.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("4bit", "8bit")
INSTALL_HINT = "pip install 'mmkit[quant]'"


class QuantizationUnavailableError(ImportError):
    """bitsandbytes is missing or does not work on this machine."""


@dataclass
class QuantizationReport:
    mode: str
    layers: int  # number of nn.Linear layers replaced
    llm_bytes_before: int
    llm_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    compute_dtype: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mb = 1024 * 1024
        return (f"{self.mode}: {self.layers} LLM linear layers quantized; LLM {self.llm_bytes_before / mb:.1f} MiB -> "
                f"{self.llm_bytes_after / mb:.1f} MiB, whole model {self.model_bytes_before / mb:.1f} MiB -> "
                f"{self.model_bytes_after / mb:.1f} MiB (compute dtype {self.compute_dtype})")


def import_bitsandbytes():
    """Import bitsandbytes or raise one clear sentence naming the extra to install."""
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except ImportError as exc:
        raise QuantizationUnavailableError(
            f"4-bit/8-bit loading needs the bitsandbytes package, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    except Exception as exc:  # broken native library, missing CPU features, ...
        raise QuantizationUnavailableError(
            f"bitsandbytes is installed but failed to load on this machine: {exc}. "
            f"Reinstall it ({INSTALL_HINT}) or run without --load-4bit/--load-8bit"
        ) from None
    return bitsandbytes


def memory_footprint(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, including bitsandbytes' quantization state."""
    total = 0
    seen: set[int] = set()

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.nelement() * t.element_size()

    for p in module.parameters():
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for name in ("absmax", "code"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(getattr(nested, "absmax", None))
                add(getattr(nested, "code", None))
        add(getattr(p, "SCB", None))
    for b in module.buffers():
        add(b)
    return total


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _quantized_linear(bnb, lin: nn.Linear, mode: str, compute_dtype: torch.dtype, quant_type: str,
                      double_quant: bool, threshold: float) -> nn.Module:
    device = lin.weight.device
    has_bias = lin.bias is not None
    weight = lin.weight.data.detach().to("cpu")
    if mode == "4bit":
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type=quant_type, device="cpu")
        new.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type=quant_type,
                                       compress_statistics=double_quant)
    else:
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=threshold, device="cpu")
        new.weight = bnb.nn.Int8Params(weight.to(torch.float32), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(lin.bias.data.detach().to("cpu", compute_dtype if mode == "4bit" else lin.bias.dtype),
                                requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes when the parameter is moved to its device


def quantize_llm(model, mode: str = "4bit", *, compute_dtype: torch.dtype = torch.bfloat16,
                 skip_modules=("lm_head",), quant_type: str = "nf4", double_quant: bool = True,
                 threshold: float = 6.0) -> QuantizationReport:
    """Replace ``model.llm``'s ``nn.Linear`` layers (except ``skip_modules``) by bitsandbytes layers, in place.

    ``mode``: ``"4bit"`` (NF4 + double quantization, ``compute_dtype`` bf16) or ``"8bit"`` (LLM.int8).
    Returns a :class:`QuantizationReport` (also stored as ``model.quantization``) with memory before/after.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choices: {', '.join(MODES)}")
    device = model.device
    if compute_dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 compute is not supported on CPU; use torch.bfloat16 (the default) or float32")
    bnb = import_bitsandbytes()
    llm = model.llm
    llm_before, model_before = memory_footprint(llm), memory_footprint(model)
    skip = tuple(skip_modules)
    targets = [
        (name, mod) for name, mod in llm.named_modules()
        if type(mod) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    if not targets:
        raise ValueError("model.llm has no nn.Linear layers to quantize (already quantized?)")
    for name, mod in targets:
        _set_child(llm, name, _quantized_linear(bnb, mod, mode, compute_dtype, quant_type, double_quant, threshold))
    # one tiny forward through a quantized layer: a missing CPU feature fails here, with a clear message
    first = llm.get_submodule(targets[0][0])
    try:
        with torch.no_grad():
            first(torch.zeros(1, first.in_features, device=device, dtype=model.dtype))
    except Exception as exc:
        raise QuantizationUnavailableError(
            f"bitsandbytes {mode} layers do not run on this machine ({type(exc).__name__}: {exc}); "
            "run without --load-4bit/--load-8bit"
        ) from exc
    report = QuantizationReport(
        mode=mode, layers=len(targets), llm_bytes_before=llm_before, llm_bytes_after=memory_footprint(llm),
        model_bytes_before=model_before, model_bytes_after=memory_footprint(model),
        compute_dtype=str(compute_dtype).replace("torch.", "") if mode == "4bit" else "int8",
    )
    model.quantization = report
    log.info("quantized the LLM: %s", report)
    return report


def quantize_from_flags(model, load_4bit: bool = False, load_8bit: bool = False) -> QuantizationReport | None:
    """Apply ``--load-4bit`` / ``--load-8bit`` (mutually exclusive) to a loaded model."""
    if load_4bit and load_8bit:
        raise ValueError("--load-4bit and --load-8bit are mutually exclusive")
    if load_4bit:
        return quantize_llm(model, "4bit")
    if load_8bit:
        return quantize_llm(model, "8bit")
    return None


def dequantize_weight(layer) -> torch.Tensor:
    """The full-precision weight of a bitsandbytes 4-bit layer (or a plain layer's weight)."""
    bnb = import_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        # bitsandbytes is optional (mmkit[quant]): only when a 4-bit weight is unpacked
        import bitsandbytes.functional as F

        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data
