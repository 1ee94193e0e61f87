"""Checkpoint layouts: mmkit's own, llava-hf (transformers), and the original LLaVA repo's.

Writers (``native.save_mmkit``, ``llava_hf.save_llava_hf``) need no builder, so the model's ``save`` can reach them
without a cycle; everything that builds a model from a directory is in ``mmkit.formats.load``.
"""

from __future__ import annotations

from mmkit.files import read_json
from pathlib import Path

from mmkit.formats.llava_hf import is_llava_hf_dir
from mmkit.formats.native import is_mmkit_dir


class UnknownLayoutError(ValueError):
    pass


def detect_layout(path: str | Path) -> str:
    """``mmkit``, ``llava-hf`` or ``llava-orig``; raises UnknownLayoutError naming what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such directory (mmkit.load takes an mmkit run directory, a llava-hf directory "
            "or an original-LLaVA directory; download hub checkpoints first, e.g. `hf download ID --local-dir DIR`)"
        )
    if is_mmkit_dir(path):
        return "mmkit"
    if is_llava_hf_dir(path):
        return "llava-hf"
    cfg = path / "config.json"
    if cfg.is_file():
        data = read_json(cfg)
        if "mm_vision_tower" in data or "mm_hidden_size" in data:
            return "llava-orig"
        raise UnknownLayoutError(
            f"{path}: unknown checkpoint layout: config.json has model_type {data.get('model_type')!r} and "
            f"architectures {data.get('architectures')}; mmkit loads mmkit run directories (mmkit.json), "
            "llava-hf directories (model_type llava / llava_next / llava_onevision) and original LLaVA "
            "directories (config with mm_vision_tower)"
        )
    raise UnknownLayoutError(
        f"{path}: unknown checkpoint layout: no mmkit.json and no config.json "
        f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})"
    )
