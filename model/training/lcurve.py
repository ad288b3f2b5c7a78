"""The learning curve: the table printed while training and lcurve.png."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt_cell(v) -> str:
    return f"{v:.6e}" if isinstance(v, float) else str(v)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_lcurve(history: list[dict], png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    keys = sorted({k for r in history for k in r if "rmse" in k})
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in history if isinstance(r.get(k), float) and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("RMSE (eV/atom, eV/A)")
    ax.legend(fontsize=7)
    ax.set_title("learning curve")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
