"""Data cleaning: drop frames whose labels or geometry cannot be right, report which elements a
pretrained model covers and how well it transfers zero-shot, and optionally pick a small
training set by active learning (active.py).

Rules (data/checks.py, where each is defined): non_finite, singular_cell, max_force, min_distance,
energy_outlier, duplicate, near_duplicate; a frame is dropped by the first rule it fails and
listed as (system, frame, reason, value).

Then the zero-shot transferability of a pretrained model: only its energy bias is refit on the
kept frames (deepmd-kit's change-by-statistic,  delta b = lstsq(N, E_label - E_model),
b <- b + delta b), and the per-frame energy and force errors are summarised by system.

Defaults keep every frame of the shared real data sets except chon_nopbc's exact duplicates:
ch4_pbe/train has a legitimate frame at z = 5.4 (skewed MD energies) and chon_nopbc holds
legitimate forces up to 151 eV/A and distances down to 0.52 A (combustion).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lamflow.model.data.checks import REASONS, RuleConfig, Source, apply_rules
from lamflow.model.data.coverage import element_coverage, trained_elements
from lamflow.model.data.formats import detect_format
from lamflow.model.data.systems import System, elements_in, find_systems, load_system
from lamflow.model.data.write import write_system
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.model.io.files import atomic_write_text
from lamflow.model.tasks.active import ActiveConfig, active_learning
from lamflow.model.tasks.evaluate import parity_plot
from lamflow.model.tasks.report import clean_section, write_markdown
from lamflow.model.training.metrics import collect
from lamflow.model.training.pretrained import load_pretrained, refit_bias, retype

NATIVE = ("auto", "deepmd/npy", "deepmd/raw")


# ----------------------------------------------------------------------------- configs


class CleanConfig(RuleConfig):
    """The rules' limits (data/checks.py: RuleConfig), then what else the clean stage does."""

    zero_shot: bool = True  # evaluate the pretrained model (when given) after a bias refit
    active: ActiveConfig | None = None  # active-learning selection on the cleaned frames


@dataclass
class CleanResult:
    out_dir: Path
    systems: list[Path]  # cleaned systems, deepmd/npy
    report_json: Path
    kept: int
    dropped: int
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading / writing


def read_sources(paths: list[str], type_map: list[str], fmt: str = "auto") -> list[Source]:
    """Every system under every path, NaN/inf kept, elements mapped onto `type_map`."""
    out: list[Source] = []
    used: set[str] = set()
    roots = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(roots)) if len(roots) > 1 else None
    for g, p in enumerate(paths):
        root = Path(p)
        # names relative to the inputs' common folder: ch4_pbe/train next to water_h2o/valid
        base = roots[g].name if common is None or roots[g] == common else roots[g].relative_to(common).as_posix()
        for sp in find_systems(root) if fmt in NATIVE else [root]:
            systems, singular = _load_with_singular_cells(sp, type_map, fmt)
            rel = sp.relative_to(root) if sp != root and root in sp.parents else None
            for s in systems:
                name = base if rel is None else f"{base}/{rel.as_posix()}"
                m = re.search(r"\[\d+:(.+)\]$", s.name)  # several systems in one file (dpdata MultiSystems)
                if m:
                    name = f"{name}/{m.group(1)}"
                unique, k = name, 2
                while unique in used:
                    unique, k = f"{name}_{k}", k + 1
                used.add(unique)
                out.append(Source(unique, str(sp), g, s, singular.get(s.name, {})))
    if not out:
        raise DataError(f"{paths}: no systems")
    return out


SINGULAR_VOLUME = 1e-6  # A^3: lamflow.model.data refuses cells below this volume


def _load_with_singular_cells(path: Path, type_map: list[str], fmt: str) -> tuple[list[System], dict]:
    """load_system with NaN/inf kept; a frame whose cell is singular is kept too, so that the rules
    drop just that frame: the system is read from a copy whose singular boxes are NaN (read into
    memory), and those frames are listed ({system name: {frame: volume}}). Other formats than
    deepmd/npy and deepmd/raw keep lamflow.model.data's error, which names the frame."""
    import tempfile

    try:
        return load_system(path, type_map, fmt, labeled=True, check_finite=False), {}
    except DataError as e:
        f = detect_format(path) if fmt == "auto" else fmt
        if "degenerate cell" not in str(e) or f not in ("deepmd/npy", "deepmd/raw"):
            raise
    with tempfile.TemporaryDirectory(prefix="lamflow-clean-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copytree(path, copy)
        singular, k0 = {}, 0
        parts = sorted(copy.glob("set.*")) if f == "deepmd/npy" else [copy]
        for part in parts:
            box_file = part / ("box.npy" if f == "deepmd/npy" else "box.raw")
            if not box_file.is_file():
                continue
            box = (np.load(box_file) if f == "deepmd/npy" else np.loadtxt(box_file, ndmin=2)).astype(np.float64)
            box = box.reshape(-1, 9)
            vol = np.linalg.det(box.reshape(-1, 3, 3))
            bad = np.nonzero(np.abs(vol) < SINGULAR_VOLUME)[0]
            singular.update({k0 + int(k): float(vol[k]) for k in bad})
            box[bad] = np.nan
            np.save(box_file, box) if f == "deepmd/npy" else np.savetxt(box_file, box)
            k0 += len(box)
        with np.errstate(invalid="ignore"):  # the NaN boxes' volumes
            systems = load_system(copy, type_map, f, labeled=True, check_finite=False)
        out = []
        for s in systems:
            s = s.materialize() if hasattr(s, "materialize") else s  # the copy goes away
            out.append(System(str(path), s.elements, s.atype, np.asarray(s.coord), None if s.box is None else np.asarray(s.box),
                              *(None if a is None else np.asarray(a) for a in (s.energy, s.force, s.virial))))
    return out, {str(path): singular}


# ----------------------------------------------------------------------------- the rules


# ----------------------------------------------------------------------------- zero-shot


def zero_shot_errors(model, sources: list[tuple[str, System]]) -> tuple[dict, list[tuple[System, dict]]]:
    """Per-frame and per-system errors of a pretrained `model` after one energy-bias refit on all
    `sources` (name, System) together. Systems with elements outside its type map are listed, not
    evaluated."""

    tm = list(model.type_map)
    named = [(name, retype(s, tm, missing="none")) for name, s in sources]
    skipped = [name for name, s in named if s is None]
    systems = [System(name, s.elements, s.atype, s.coord, s.box, s.energy, s.force, s.virial)
               for name, s in named if s is not None and s.energy is not None]
    if not systems:
        return {"type_map": tm, "skipped": skipped, "systems": {}, "overall": {}}, []
    _, preds, delta = refit_bias(model, systems)
    per = list(zip(systems, preds))
    res = collect(per)
    frames = {}
    for s, p in per:
        f_err = None if s.force is None else np.linalg.norm(p["force"] - s.force, axis=-1)  # [nf, natoms]
        frames[s.name] = {
            "e_per_atom": ((p["energy"] - s.energy) / s.natoms).tolist(),
            "rmse_f": None if f_err is None else np.sqrt((f_err**2).mean(axis=1) / 3).tolist(),
            "max_f": None if f_err is None else f_err.max(axis=1).tolist(),
        }
    res.update({"type_map": tm, "skipped": skipped, "bias_delta": dict(zip(tm, np.asarray(delta).tolist())),
                "frames": frames})
    return res, per


# ----------------------------------------------------------------------------- the entry point


def clean(systems: list[str], out_dir: str | os.PathLike, cfg: CleanConfig | None = None, *,
          type_map: list[str] | None = None, pretrained: str | None = None, branch: str | None = None,
          fmt: str = "auto", log: Callable = print) -> CleanResult:
    """Clean `systems` (paths in any dpdata format) into OUT/data/<name> (deepmd/npy), with
    OUT/clean.json (every dropped frame and why, coverage, zero-shot errors), OUT/clean.png and
    OUT/report.md. With a pretrained checkpoint, its element coverage and zero-shot errors."""
    cfg = cfg or CleanConfig()
    systems = [str(p) for p in ([systems] if isinstance(systems, (str, os.PathLike)) else systems)]
    if not systems:
        raise DataError("clean: no systems given")
    for p in systems:
        if not Path(p).exists():
            raise DataError(f"{p}: no such file or directory")
        if fmt == "auto" and Path(p).is_file():
            detect_format(Path(p))  # a clear error for an unknown file before any work
    pre_tm, pre_model, pre_trained = None, None, None
    if pretrained is not None:
        pre_payload = read_checkpoint(pretrained)  # CheckpointError before any work
        pre_tm, pre_trained = list(pre_payload.get("type_map") or []), trained_elements(pre_payload, branch)
        del pre_payload
        if cfg.zero_shot:
            pre_model = load_pretrained(pretrained, branch)
    if cfg.active is not None and cfg.active.model is None and pretrained is None:
        raise ConfigError("active.model: needed to train from scratch when no pretrained model is given")
    from dpdata.periodic_table import ELEMENTS

    for p in systems:  # a name that is no element (a typo in type_map.raw) would be kept as a new type
        odd = [e for e in elements_in([p], fmt) if e not in ELEMENTS]
        if odd:
            raise DataError(f"{p}: element(s) {', '.join(map(repr, odd))} in its type map are not chemical elements")
    data_el = elements_in(systems, fmt)
    tm = list(type_map) if type_map else data_el
    sources = read_sources(systems, tm, fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # after every input was read: a bad one leaves nothing behind
    total = sum(src.system.nframes for src in sources)
    log(f"clean: {total} frames in {len(sources)} systems, elements {data_el}")
    keep, drops, diag = apply_rules(sources, cfg, len(tm))
    drops.sort(key=lambda d: ([src.name for src in sources].index(d.system), d.frame))

    # cleaned systems, replacing OUT/data as a whole
    tmp = out / ".data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    per_system = []
    for src, m in zip(sources, keep):
        kept_sys = src.system.subset(np.nonzero(m)[0])
        if kept_sys.nframes:
            (tmp / src.name).parent.mkdir(parents=True, exist_ok=True)
            write_system(kept_sys, tmp / src.name)
        per_system.append({"name": src.name, "source": src.path, "nframes": src.system.nframes,
                           "natoms": src.system.natoms, "kept": int(m.sum()), "dropped": int((~m).sum()),
                           "out": f"data/{src.name}" if m.any() else None})
    shutil.rmtree(out / "data", ignore_errors=True)
    os.replace(tmp, out / "data")
    written = [out / "data" / r["name"] for r in per_system if r["out"]]
    kept = sum(int(m.sum()) for m in keep)

    coverage = {"data_elements": data_el}
    if pre_tm is not None:
        coverage.update({"model_type_map": pre_tm, "uncovered": [e for e in data_el if e not in pre_tm]})
        if coverage["uncovered"]:
            log(f"coverage: element(s) {', '.join(coverage['uncovered'])} not in the pretrained type map {pre_tm}")
        if pre_trained is not None:  # "in the type map" is not "trained on" (data/coverage.py)

            untrained = element_coverage(data_el, pre_tm, pre_trained)["untrained"]
            coverage.update({"trained_elements": pre_trained, "untrained": untrained})
            if untrained:
                msg = (f"Element(s) {', '.join(untrained)} are in the pretrained type map but not in its training data "
                       f"(trained on {', '.join(pre_trained)}): zero-shot and fine-tuned predictions for them start untrained.")
                log(f"coverage: {msg}")
                diag["notes"].append(msg)
    counts = {r: sum(d.reason == r for d in drops) for r in REASONS}
    report = {
        "config": cfg.model_dump(mode="json"),
        "inputs": systems,
        "type_map": tm,
        "nframes": total,
        "kept": kept,
        "dropped": total - kept,
        "counts_by_reason": counts,
        "systems": per_system,
        "dropped_frames": [d.__dict__ for d in drops],
        "similar": {"count": len(diag["similar"]), "first": diag["similar"][:20]},
        "notes": diag["notes"],
        "coverage": coverage,
    }
    log(f"clean: kept {kept} of {total} frames; dropped " + (", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"))

    if pre_model is not None:
        kept_named = [(src.name, src.system.subset(np.nonzero(m)[0])) for src, m in zip(sources, keep) if m.any()]
        zs, per = zero_shot_errors(pre_model, kept_named)
        atomic_write_text(out / "zero_shot.json", json.dumps(zs, indent=2))
        if per:
            parity_plot(per, out / "zero_shot_parity.png", "zero-shot (pretrained, energy bias refit) vs DFT",
                        dataset=out.name)
        report["zero_shot"] = {k: zs[k] for k in ("systems", "overall", "skipped", "bias_delta") if k in zs}
        o = zs.get("overall", {})
        if o:
            log(f"zero-shot: energy RMSE {1000 * o.get('rmse_e_per_atom', float('nan')):.2f} meV/atom, "
                f"force RMSE {1000 * o.get('rmse_f', float('nan')):.2f} meV/A (bias refit on {o['nframes']} frames)")

    if cfg.active is not None:
        kept_systems = [src.system.subset(np.nonzero(m)[0]) for src, m in zip(sources, keep) if m.any()]
        names = [src.name for src, m in zip(sources, keep) if m.any()]
        for s, name in zip(kept_systems, names):
            s.name = name
        act = active_learning(kept_systems, out / "active", cfg.active, pretrained=pretrained, branch=branch, log=log)
        report["active"] = {"selected": [str(p.relative_to(out)) for p in act.selected], "curve": act.curve,
                            "lcurve_png": str(act.lcurve_png.relative_to(out))}

    plot_clean(diag, cfg, counts, out / "clean.png", title=f"{out.name}: {total} frames, {kept} kept")
    report_json = atomic_write_text(out / "clean.json", json.dumps(report, indent=2))

    write_markdown([clean_section(report, out, title="Summary")], out / "report.md", title="Data cleaning")
    return CleanResult(out, written, report_json, kept, total - kept, report)


def plot_clean(diag: dict, cfg: CleanConfig, counts: dict, png: Path, title: str = "") -> Path:
    """Max atomic force and energy z-score histograms with their limits; drops by reason. Counts
    are on a log axis only when they span more than two decades; the force axis is logarithmic
    when forces span more than three (failed SCF frames sit at 1e2-1e4 eV/A)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    f = np.concatenate(diag["max_force"]) if diag["max_force"] else np.zeros(0)
    z = np.concatenate(diag["energy_z"]) if diag["energy_z"] else np.zeros(0)
    f, z = f[np.isfinite(f)], z[np.isfinite(z)]
    limit_shown = not len(f) or cfg.max_force <= 3 * float(f.max())  # else the limit line would squash the data
    if len(f):
        lo, hi = max(float(f.min()), 1e-3), max(float(f.max()), cfg.max_force if limit_shown else 0.0)
        wide = hi / lo > 1e3
        bins = np.geomspace(lo, hi * 1.01, 50) if wide else 50
        n, *_ = axes[0].hist(f, bins=bins)
        if wide:
            axes[0].set_xscale("log")
        if n.max() > 100 * max(1, n[n > 0].min()):
            axes[0].set_yscale("log")
    if limit_shown:
        axes[0].axvline(cfg.max_force, color="r", ls="--", label=f"max_force {cfg.max_force:g} eV/A")
    else:
        axes[0].plot([], [], "r--", label=f"max_force {cfg.max_force:g} eV/A (off scale)")
    axes[0].set_xlabel("max atomic force per frame (eV/A)")
    axes[0].set_ylabel("frames")
    axes[0].legend(fontsize=7)
    if len(z):
        n, *_ = axes[1].hist(z, bins=50)
        if n.max() > 100 * max(1, n[n > 0].min()):
            axes[1].set_yscale("log")
    for sign in (-1, 1):
        axes[1].axvline(sign * cfg.energy_outlier_z, color="r", ls="--")
    axes[1].set_xlabel("robust z-score of the energy-per-atom residual (dimensionless)")
    axes[1].set_ylabel("frames")
    axes[2].bar(list(counts), list(counts.values()), color="tab:red")
    axes[2].set_ylabel("frames dropped")
    axes[2].yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[2].set_ylim(0, max([1, *counts.values()]))
    for ax in axes[:2]:
        if ax.get_yscale() == "linear":
            ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[2].set_title("dropped, by reason")
    axes[2].tick_params(axis="x", rotation=30, labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
