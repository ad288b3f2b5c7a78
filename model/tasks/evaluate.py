"""Errors of a model on labelled systems: energy per atom, force, virial per atom (RMSE and MAE),
per system and overall (frames weight energies and virials, atoms weight forces), as JSON and a
parity plot; `transferability` adds a parity plot per system, a bar chart across systems, the
zero-shot (energy bias refit) errors of a pretrained model for comparison, and report.md."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lamflow.model.data.systems import System, load_systems
from lamflow.model.io.files import atomic_write_text
from lamflow.model.tasks.baseline import baseline_errors, fit_baseline, normalised
from lamflow.model.tasks.report import (
    Section,
    bar_chart,
    baseline_table,
    compare_table,
    metrics_table,
    short_names,
    verdicts,
    write_markdown,
)
from lamflow.model.training.metrics import collect, predict_systems
from lamflow.model.training.pretrained import load_pretrained, refit_bias, retype


def evaluate_systems(model, systems: list[System], out_dir: str | os.PathLike | None = None, label: str = "model",
                     dataset: str = "", who: tuple[str, str] = ("DFT", "model")) -> dict:
    """Evaluate on every system; write metrics.json and parity.png into out_dir when given."""
    per = predict_systems(model, systems)
    result = collect(per)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        parity_plot(per, out / "parity.png", label, dataset=dataset, who=who)
    return result


def _square(ax, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
    """Equal axes over the joint range of x and y, with the y = x line."""
    v = np.concatenate([np.ravel(a) for a in xs + ys]) if xs else np.zeros(1)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    pad = 0.05 * (hi - lo) or 0.5 * max(abs(hi), 1e-3)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def parity_plot(per: list[tuple[System, dict]], png: Path, title: str = "", *, dataset: str = "",
                who: tuple[str, str] = ("DFT", "model")) -> Path:
    """Energy and force parity, square. Energies are per atom relative to each system's mean of
    the reference (so systems with energies eV/atom apart share one honest axis; a constant
    offset is what the per-element bias fixes, the spread is what the model must learn); RMSEs
    in the legend. `who` names the reference and the prediction ("DFT", "model"; a student plot
    says ("teacher", "student"))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, model = who
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    ex, ey, fx, fy = [], [], [], []
    for s, pred in per:
        label = Path(s.name).name or s.name
        if s.energy is not None:
            e_ref = s.energy / s.natoms
            mu = float(np.mean(e_ref))
            x, y = 1000 * (e_ref - mu), 1000 * (pred["energy"] / s.natoms - mu)
            rmse = float(np.sqrt(np.mean((y - x) ** 2)))
            axes[0].scatter(x, y, s=6, label=f"{label} ({rmse:.1f} meV/atom)")
            ex.append(x)
            ey.append(y)
        if s.force is not None:
            x, y = s.force.reshape(-1), pred["force"].reshape(-1)
            rmse = float(np.sqrt(np.mean((y - x) ** 2)))
            axes[1].scatter(x, y, s=2, alpha=0.5, label=f"{label} ({1000 * rmse:.0f} meV/A)")
            fx.append(x)
            fy.append(y)
    _square(axes[0], ex, ey)
    _square(axes[1], fx, fy)
    axes[0].set_xlabel(f"{ref} energy - its mean per system (meV/atom)")
    axes[0].set_ylabel(f"{model} energy - same offset (meV/atom)")
    axes[0].set_title("energy per atom")
    axes[1].set_xlabel(f"{ref} force component (eV/A)")
    axes[1].set_ylabel(f"{model} force component (eV/A)")
    axes[1].set_title("force")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="system (RMSE)", title_fontsize=7)
    fig.suptitle(" - ".join(t for t in (dataset, title) if t) or f"{model} vs {ref}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def evaluate_paths(model, paths: list[str], type_map_check: bool = True, fmt: str = "auto", out_dir=None) -> dict:
    systems = load_systems(paths, list(model.type_map), fmt)
    return evaluate_systems(model, systems, out_dir)


# ----------------------------------------------------------------------------- transferability


@dataclass
class TransferResult:
    out_dir: Path
    metrics: dict  # {"systems": {name: m}, "overall": m} of the model (metrics.json)
    zero_shot: dict | None  # the same for the pretrained model after a bias refit per system
    compare: dict | None  # {"labels", "first": zero-shot, "second": model} (compare.json)
    report: Path  # report.md


def baseline_section(metrics: dict, systems: list[System], ntypes: int, label: str, out: Path):
    """The model's errors next to the composition-only baseline, fitted here on the tested frames
    themselves (no training data is given to `lamflow test`): an in-sample fit, so the baseline is
    if anything too good and a ratio < 1 is conservative. Writes baseline.json."""

    base = baseline_errors(fit_baseline(systems, ntypes), systems)
    atomic_write_text(out / "baseline.json", json.dumps(base, indent=2))
    short = short_names(list(metrics["systems"]))
    summary = {"system": "all", "role": label, "nframes": metrics["overall"]["nframes"],
               "normalised": normalised(metrics["overall"], base["overall"]),
               "systems": {short[n]: {"nframes": m["nframes"], "normalised": normalised(m, base["systems"][n])}
                           for n, m in metrics["systems"].items()}}
    flags = verdicts(summary)
    text = ("Baseline: energy from element counts (least squares on these frames), zero forces and virials. "
            + ("**" + "; ".join(flags) + "**" if flags else f"{label} is better than the baseline on every error."))
    return Section("Against the composition-only baseline", text, [baseline_table([summary])])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "system"


def transferability(model, paths: list[str], out_dir: str | os.PathLike, *, fmt: str = "auto",
                    zero_shot=None, label: str = "model", log: Callable = print) -> TransferResult:
    """Test `model` on every system of `paths`: metrics.json, parity.png (all systems),
    parity/<nn>_<system>.png, bars.png and report.md in out_dir. With `zero_shot` (a pretrained
    checkpoint path or model), its energy bias is refit on each system on its own and its errors
    go to zero_shot/metrics.json, beside the model's in compare.json and the report's table."""

    out = Path(out_dir)
    pre = None
    if zero_shot is not None:  # a bad checkpoint fails before any evaluation
        pre = load_pretrained(zero_shot) if isinstance(zero_shot, (str, os.PathLike)) else zero_shot
    systems = load_systems(paths, list(model.type_map), fmt)
    per = predict_systems(model, systems)
    metrics = collect(per)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    parity_plot(per, out / "parity.png", label)
    short = short_names([s.name for s in systems])
    images = []
    for i, (s, pred) in enumerate(per):
        images.append(parity_plot([(s, pred)], out / "parity" / f"{i:02d}_{_slug(short[s.name])}.png", f"{label}: {short[s.name]}"))
    sections = [Section(f"Errors of {label}", f"{metrics['overall']['nframes']} frames in {len(systems)} systems.",
                        [metrics_table(metrics)], [out / "parity.png"])]
    sections.append(baseline_section(metrics, systems, len(model.type_map), label, out))
    zs = compare = None
    if pre is not None:
        zper, skipped = [], []
        for s in systems:
            r = retype(s, list(pre.type_map), missing="none")
            if r is None or r.energy is None:
                skipped.append(s.name)
                continue
            _, preds, _ = refit_bias(pre, [r])
            zper.append((r, preds[0]))
        zs = collect(zper) if zper else {"systems": {}, "overall": {}}
        zs["skipped"] = skipped
        atomic_write_text(out / "zero_shot" / "metrics.json", json.dumps(zs, indent=2))
        if zper:
            parity_plot(zper, out / "zero_shot" / "parity.png", "zero-shot (energy bias refit per system)")
        covered = {s.name for s, _ in zper}  # compare on the same frames: overall of the covered systems only
        same = metrics if not skipped else collect([(s, p) for s, p in per if s.name in covered])
        compare = {"labels": ["zero-shot", label], "first": zs, "second": same}
        atomic_write_text(out / "compare.json", json.dumps(compare, indent=2))
        text = "The pretrained model with only its energy bias refit on each system, against " + label + "."
        if skipped:
            text += f" Not covered by the pretrained type map: {', '.join(short[n] for n in skipped)}."
        sections.append(Section("Zero-shot vs " + label, text, [compare_table(zs, same, ("zero-shot", label))],
                                [out / "zero_shot" / "parity.png"] if zper else []))
        bar_chart({"zero-shot": zs, label: metrics}, out / "bars.png", title="errors per system")
    else:
        bar_chart(metrics, out / "bars.png", title=f"errors of {label} per system")
    sections.append(Section("Per system", "", [], [out / "bars.png"] + images))
    report = write_markdown(sections, out / "report.md", title=f"Transferability test: {label}")
    log(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and plots")
    return TransferResult(out, metrics, zs, compare, report)
