"""Active-learning data selection (lam-data-cleaning's loop): how few frames does a model need?

    hold out valid_ratio of the frames (never selected) for the learning curve
    start from a random ratio_init fraction of the other frames (the candidates)
    for round r = 0 .. len(ratio_selected):
        train (fine-tune the pretrained model, or train from scratch) on the selected frames
        learning curve += (number of selected frames, errors on the held-out frames)
        if r < len(ratio_selected): rank the candidates left by
            rmse_f  sqrt(mean_i |F_i - F_i^label|^2 / 3)       per frame, needs trusted labels
            max_f   max_i |F_i - F_i^label|
            devi_f  max_i sqrt(mean_m |F_i^m - <F_i>|^2)         disagreement of numb_models models
                                                                 (deepmd-kit's max_devi_f; labels unused)
          and move the worst ratio_selected[r] * (number of candidates) frames into the training set
          (over all systems, or per system with select_type: system)

With a pretrained model, the curve starts with its zero-shot errors (energy bias refit on the
held-out frames) at 0 frames.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
from pydantic import Field, field_validator

from lamflow.model.data.systems import System
from lamflow.model.data.write import write_system
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import load_model, resolve_device
from lamflow.model.io.files import atomic_write_text
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.schema import Strict
from lamflow.model.tasks.evaluate import evaluate_systems
from lamflow.model.training.config import DataConfig, LearningRateConfig, LossConfig, TrainConfig, TrainingConfig
from lamflow.model.training.metrics import collect
from lamflow.model.training.pretrained import bias_delta, load_pretrained, refit_bias, retype
from lamflow.model.training.trainer import train

Frames = list[np.ndarray]  # per system, sorted frame indices



class ActiveConfig(Strict):
    """Active-learning selection (lam-data-cleaning's keys where one exists)."""

    ratio_init: float = Field(0.1, gt=0, le=1)  # random fraction of the frames to start from
    ratio_selected: list[float] = [0.1, 0.1]  # per round, fraction of all frames moved to the training set
    criteria: Literal["rmse_f", "max_f", "devi_f"] = "rmse_f"  # per-frame force RMSE, max atomic force error,
    #                                                  or ensemble disagreement (max_i std of F_i; no labels used)
    select_type: Literal["global", "system"] = "global"  # rank all frames together, or each system on its own
    numb_models: int = Field(2, ge=2)  # ensemble size for criteria devi_f
    valid_ratio: float = Field(0.1, ge=0, lt=1)  # held out (never selected) for the learning curve
    seed: int = 1
    model: ModelConfig | None = None  # architecture when training from scratch (None: needs a pretrained model)
    learning_rate: LearningRateConfig = LearningRateConfig()
    loss: LossConfig = LossConfig()
    numb_steps: int = Field(1000, gt=0)  # per round
    batch_size: Union[int, str] = "auto"
    disp_freq: int | None = Field(None, gt=0)  # default numb_steps // 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("ratio_selected")
    @classmethod
    def _fractions(cls, v):
        if any(not 0 < r <= 1 for r in v):
            raise ValueError(f"every ratio must be in (0, 1], got {v}")
        return v


@dataclass
class ActiveResult:
    out_dir: Path
    selected: list[Path]  # the final training set, deepmd/npy, one folder per system
    model: Path  # checkpoint trained on it (the last round)
    curve: list[dict]  # [{"round", "nsamples", "rmse_e_per_atom", "rmse_f", ...}]
    lcurve_json: Path  # active.json: config, curve, frames selected per round
    lcurve_png: Path


# ----------------------------------------------------------------------------- ranking and selection


def frame_force_errors(pred_force: np.ndarray, label_force: np.ndarray, criteria: str) -> np.ndarray:
    """[nf] rmse_f or max_f of one system's frames; forces [nf, natoms, 3]."""
    err = np.linalg.norm(pred_force - label_force, axis=-1)  # [nf, natoms]
    return np.sqrt((err**2).mean(axis=1) / 3) if criteria == "rmse_f" else err.max(axis=1)


def force_deviation(forces: list[np.ndarray]) -> np.ndarray:
    """[nf] max_i of the std over models of F_i (deepmd-kit's max_devi_f); forces: numb_models x [nf, natoms, 3]."""
    f = np.stack(forces)  # [nmodels, nf, natoms, 3]
    dev = np.sqrt(((f - f.mean(axis=0)) ** 2).sum(-1).mean(axis=0))  # [nf, natoms]
    return dev.max(axis=1)


def select_worst(scores: list[np.ndarray], pool: Frames, n: int | list[int], per_system: bool) -> Frames:
    """The frames of `pool` with the largest scores (scores[i][j] belongs to pool[i][j]): the n
    worst overall, or n[i] per system (per_system). Ties keep the lower system, then frame."""
    if per_system:
        counts = n if isinstance(n, list) else [n] * len(pool)
        return [np.sort(p[np.argsort(-s, kind="stable")[:c]]) for s, p, c in zip(scores, pool, counts)]
    flat = [(-float(v), i, int(k)) for i, (s, p) in enumerate(zip(scores, pool)) for v, k in zip(s, p)]
    flat.sort()
    picked = [[] for _ in pool]
    for _, i, k in flat[:n]:
        picked[i].append(k)
    return [np.array(sorted(p), dtype=np.int64) for p in picked]


def _union(a: Frames, b: Frames) -> Frames:
    return [np.union1d(x, y).astype(np.int64) for x, y in zip(a, b)]


def _minus(a: Frames, b: Frames) -> Frames:
    return [np.setdiff1d(x, y).astype(np.int64) for x, y in zip(a, b)]


def _count(f: Frames) -> int:
    return int(sum(len(x) for x in f))


def _random_split(systems: list[System], n: int, rng: np.random.Generator, among: Frames) -> Frames:
    flat = [(i, int(k)) for i, fr in enumerate(among) for k in fr]
    pick = rng.choice(len(flat), size=min(n, len(flat)), replace=False) if flat else []
    out = [[] for _ in systems]
    for j in pick:
        i, k = flat[j]
        out[i].append(k)
    return [np.array(sorted(x), dtype=np.int64) for x in out]


# ----------------------------------------------------------------------------- training one round


def _write_frames(systems: list[System], frames: Frames, folder: Path) -> list[str]:
    shutil.rmtree(folder, ignore_errors=True)
    paths = []
    for n, (s, fr) in enumerate(zip(systems, frames)):
        if len(fr):
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s.name).name if os.path.isabs(s.name) else s.name).strip("_")
            paths.append(str(write_system(s.subset(fr), folder / f"{n:03d}_{slug}")))
    return paths


def _train_config(cfg: ActiveConfig, model_cfg: ModelConfig, train: list[str], valid: list[str], seed: int) -> TrainConfig:
    steps = cfg.numb_steps
    return TrainConfig(
        model=model_cfg, learning_rate=cfg.learning_rate, loss=cfg.loss,
        training=TrainingConfig(
            training_data=DataConfig(systems=train, batch_size=cfg.batch_size),
            validation_data=DataConfig(systems=valid, batch_size=cfg.batch_size) if valid else None,
            numb_steps=steps, seed=seed, disp_freq=cfg.disp_freq or max(1, steps // 10), save_freq=steps,
            device=cfg.device))


def _trainer(cfg: ActiveConfig, pretrained: str | None, branch: str | None, log: Callable):
    """(model config, fn(train_cfg, out_dir) -> checkpoint): fine-tune when pretrained (with
    lamflow.model.training.finetune when present, else: the pretrained weights and a bias refit, then
    trainer.train), else train from scratch."""

    if pretrained is None:
        return cfg.model, lambda tc, out: train(tc, out, log=log).checkpoint
    head = load_pretrained(pretrained, branch)  # a ConfigError / CheckpointError before any training
    model_cfg = cfg.model or head.cfg
    try:  # lazy and optional: a build without the fine-tuning stage trains from the pretrained weights
        from lamflow.model.training.finetune import finetune
    except ImportError:
        finetune = None
    if finetune is not None:
        return model_cfg, lambda tc, out: finetune(tc, pretrained, out, branch=branch, log=log).checkpoint

    def init(model, train_sys):
        model.load_state_dict(head.state_dict())
        delta, _ = bias_delta(model, train_sys)
        model.out_bias.add_(model.out_bias.new_tensor(delta))

    return head.cfg, lambda tc, out: train(tc.model_copy(update={"model": head.cfg}), out, init=init, log=log).checkpoint


def _predict(ckpt: Path, systems: list[System], frames: Frames, device: str) -> list[dict | None]:
    model = load_model(ckpt, device)
    return [evaluate_system(model, s.subset(fr), virial=False) if len(fr) else None for s, fr in zip(systems, frames)]


def _curve_point(ckpt: Path, systems: list[System], frames: Frames, device: str) -> dict:
    subs = [s.subset(fr) for s, fr in zip(systems, frames) if len(fr)]
    return evaluate_systems(load_model(ckpt, device), subs)["overall"]


# ----------------------------------------------------------------------------- the loop


def active_learning(systems: list[System], out_dir: str | os.PathLike, cfg: ActiveConfig, *,
                    valid: list[System] | None = None, pretrained: str | None = None, branch: str | None = None,
                    log: Callable = print) -> ActiveResult:
    """Select a training set from `systems` round by round (module docstring). Writes
    OUT/iter-NNN/{data,train}, OUT/selected/<NNN> (deepmd/npy), OUT/active.json, OUT/lcurve.png."""
    if cfg.model is None and pretrained is None:
        raise ConfigError("active.model: needed to train from scratch when no pretrained model is given")
    if cfg.criteria != "devi_f" and any(s.force is None for s in systems):
        raise DataError(f"{next(s.name for s in systems if s.force is None)}: no force labels for criteria {cfg.criteria}")
    model_cfg, fit = _trainer(cfg, pretrained, branch, log)
    if model_cfg is not None:
        missing = sorted({s.elements[t] for s in systems for t in set(s.atype.tolist())} - set(model_cfg.type_map))
        if missing:
            raise ConfigError(f"active: element(s) {', '.join(missing)} not in the model type map {model_cfg.type_map}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    device = str(resolve_device(cfg.device))
    everything: Frames = [np.arange(s.nframes) for s in systems]
    total = _count(everything)

    # held-out frames for the curve, then the candidates and the random start
    if valid is None and cfg.valid_ratio > 0:
        held = _random_split(systems, max(1, round(cfg.valid_ratio * total)), rng, everything)
        valid_sys, valid_frames = systems, held
    elif valid is not None:
        held = [np.zeros(0, dtype=np.int64) for _ in systems]
        valid_sys, valid_frames = valid, [np.arange(s.nframes) for s in valid]
    else:
        held = [np.zeros(0, dtype=np.int64) for _ in systems]
        valid_sys, valid_frames = None, None  # the curve is measured on the candidates left
    cands = _minus(everything, held)
    ncand = _count(cands)
    if ncand < 2:
        raise DataError(f"active learning needs at least 2 candidate frames, got {ncand}")
    selected = _random_split(systems, max(1, math.ceil(cfg.ratio_init * ncand)), rng, cands)
    valid_paths = _write_frames(valid_sys, valid_frames, out / "valid") if valid_sys is not None else []

    curve, rounds = [], []
    if pretrained is not None and valid_sys is not None:
        pre = load_pretrained(pretrained, branch)
        subs = [retype(s.subset(fr), list(pre.type_map), missing="none") for s, fr in zip(valid_sys, valid_frames) if len(fr)]
        subs = [s for s in subs if s is not None and s.energy is not None]  # elements it lacks: fine-tuning refuses them
        if subs:
            _, preds, _ = refit_bias(pre, subs)
            curve.append({"round": "zero-shot", "nsamples": 0, **collect(list(zip(subs, preds)))["overall"]})

    nrounds = len(cfg.ratio_selected)
    ckpt = None
    for r in range(nrounds + 1):
        it = out / f"iter-{r:03d}"
        train_paths = _write_frames(systems, selected, it / "data")
        ckpts = []
        nmodels = cfg.numb_models if cfg.criteria == "devi_f" and r < nrounds else 1
        for m in range(nmodels):
            tc = _train_config(cfg, model_cfg, train_paths, valid_paths, cfg.seed + 1000 * r + m)
            ckpts.append(fit(tc, it / f"train-{m}"))
        ckpt = ckpts[0]
        pool = _minus(cands, selected)
        if valid_sys is not None:
            point = _curve_point(ckpt, valid_sys, valid_frames, device)
        else:
            point = _curve_point(ckpt, systems, pool if _count(pool) else selected, device)
        point = {"round": r, "nsamples": _count(selected), **point}
        curve.append(point)
        log(f"active round {r}: {point['nsamples']} frames, rmse_e_per_atom {point.get('rmse_e_per_atom', float('nan')):.4g}"
            f" eV, rmse_f {point.get('rmse_f', float('nan')):.4g} eV/A")
        record = {"round": r, "nsamples": _count(selected), "checkpoint": str(ckpt.relative_to(out))}
        if r < nrounds and _count(pool):
            scores = rank(ckpts, systems, pool, cfg.criteria, device)
            if cfg.select_type == "system":
                n = [min(len(p), math.ceil(cfg.ratio_selected[r] * len(c))) for p, c in zip(pool, cands)]
            else:
                n = min(_count(pool), max(1, math.ceil(cfg.ratio_selected[r] * ncand)))
            new = select_worst(scores, pool, n, cfg.select_type == "system")
            record["added"] = {systems[i].name: fr.tolist() for i, fr in enumerate(new) if len(fr)}
            selected = _union(selected, new)
        rounds.append(record)

    final = _write_frames(systems, selected, out / "selected")
    report = {
        "config": cfg.model_dump(mode="json"),
        "nframes": total,
        "valid": {systems[i].name: fr.tolist() for i, fr in enumerate(held) if len(fr)} if valid is None else "given",
        "curve": curve,
        "rounds": rounds,
        "selected": {systems[i].name: fr.tolist() for i, fr in enumerate(selected) if len(fr)},
    }
    lcurve_json = atomic_write_text(out / "active.json", json.dumps(report, indent=2))
    png = plot_learning_curve(curve, out / "lcurve.png")
    return ActiveResult(out, [Path(p) for p in final], ckpt, curve, lcurve_json, png)


def rank(ckpts: list[Path], systems: list[System], pool: Frames, criteria: str, device: str) -> list[np.ndarray]:
    """Scores of the pool frames (higher = select first), per system."""
    preds = [_predict(c, systems, pool, device) for c in ckpts]
    scores = []
    for i, (s, fr) in enumerate(zip(systems, pool)):
        if not len(fr):
            scores.append(np.zeros(0))
        elif criteria == "devi_f":
            scores.append(force_deviation([p[i]["force"] for p in preds]))
        else:
            scores.append(frame_force_errors(preds[0][i]["force"], s.force[fr], criteria))
    return scores


def plot_learning_curve(curve: list[dict], png: Path) -> Path:
    """Validation errors vs number of training frames; the zero-shot point as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, t) for k, t in (("rmse_e_per_atom", "energy RMSE (meV/atom)"), ("rmse_f", "force RMSE (meV/A)"))
            if any(p.get(k) is not None for p in curve)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 3.8), squeeze=False)
    for ax, (k, title) in zip(axes[0], keys):
        pts = [(p["nsamples"], 1000 * p[k]) for p in curve if p["nsamples"] > 0 and p.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label="trained")
        for p in curve:
            if p["nsamples"] == 0 and p.get(k) is not None:
                ax.axhline(1000 * p[k], color="gray", ls="--", label="zero-shot")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training frames")
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
