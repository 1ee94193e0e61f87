"""The loss curve every training run writes (``RUN_DIR/loss.png``)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mmkit.train")


def plot_losses(results, path: Path) -> None:
    """Plot each stage's per-step losses (``StageResult.losses``) end to end, log scale."""
    try:
        # matplotlib is optional (mmkit[plot]) and slow to import: only for the plot
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): no display needed
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install 'mmkit[plot]'); losses are in metrics.jsonl")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for r in results:
        xs = range(offset + 1, offset + len(r.losses) + 1)
        ax.plot(xs, r.losses, label=r.name, linewidth=1)
        offset += len(r.losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
