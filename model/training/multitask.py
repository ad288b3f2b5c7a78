"""Multi-task pre-training: one shared descriptor, one head per dataset ("branch"); the model is
nn/multitask.py, the config (deepmd-kit's multi-task input) training/multitask_config.py.

    D_i      = descriptor(structure)                      shared by every branch (type embedding included)
    E^b_i    = F^b_{t_i}(D_i) + out_bias^b[t_i]           energy branch b: its own fitting net and bias
    dx^b_i   = denoise head^b(descriptor output)          denoise branch (nn/denoise_head.py, training/denoise.py)
Each training step draws ONE branch b with probability model_prob[b] (default: proportional to
its number of training frames), a batch of b's data, and takes an Adam step on b's loss; the
shared descriptor thus learns from every dataset while each head keeps its own energy
reference (DFT codes, pseudopotentials and functionals differ by ~100 eV/atom).

Statistics: the env-matrix mean/std of the shared descriptor pool all branches' data; each
energy branch's bias is the least-squares fit of ITS data's energies on composition (on the
residual of its untrained head, as stats.fit_statistics does for a single-task model). The
neighbour statistic (sel: auto) and the env-matrix statistics are cached in the stat file
(`training.stat_file`, default OUT/stat_file.pt), keyed by every branch's sample, as single-task.

The config (deepmd-kit's multi-task input: shared_dict, model_dict, loss_dict, data_dict, and how
branches name shared parts) is laid out in training/multitask_config.py; branch names are also
the names of checkpoint entries (`heads.<name>.*`), the lcurve column prefixes and the
`--branch` choices.
"""

from __future__ import annotations

import json
import os
import time
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lamflow.model.data.batch import DataSet
from lamflow.model.data.systems import System, load_systems
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint
from lamflow.model.io.files import atomic_write_text
from lamflow.model.nn.config import MASK
from lamflow.model.nn.descriptor.base import EnvMatBlock
from lamflow.model.nn.multitask import DenoiseHeadConfig, EnergyHeadConfig, MultiTaskModel, MultiTaskModelConfig
from lamflow.model.training import distributed
from lamflow.model.training.bias_check import warn_underdetermined_bias
from lamflow.model.training.denoise import DenoiseLoss
from lamflow.model.training.lcurve import plot_lcurve
from lamflow.model.training.loss import EnergyLoss
from lamflow.model.training.metrics import dataset_metrics
from lamflow.model.training.multitask_config import MultiTaskTrainConfig
from lamflow.model.training.stats import (
    data_fingerprint,
    env_stats,
    neighbor_counter,
    resolve_sel,
    sampled_energy_bias,
    stat_frames,
    stat_samples,
)
from lamflow.model.training.trainer import Task, Trainer, TrainResult, seed_everything, set_threads, stat_file

# ----------------------------------------------------------------------------- the user's config


# ----------------------------------------------------------------------------- the model


# ----------------------------------------------------------------------------- data, build, statistics


def load_branch_data(cfg: MultiTaskTrainConfig) -> dict[str, tuple[list[System], list[System] | None]]:
    """Every branch's (train, valid) systems on the shared type map; a DataError names the branch
    and the elements its type map lacks. Denoise branches read structures only (labels ignored)."""
    tm = cfg.type_map
    out = {}
    for name in cfg.branches:
        labeled = cfg.model.model_dict[name].task == "ener"
        allowed = set(cfg.branch_type_map(name))
        dd = cfg.training.data_dict[name]
        parts = []
        for dc in (dd.training_data, dd.validation_data):
            if dc is None:
                parts.append(None)
                continue
            try:
                systems = load_systems(dc.system_list, tm, dc.fmt, labeled, lazy=True)
            except DataError as e:
                raise DataError(f"branch {name!r}: {e}") from None
            for s in systems:
                extra = sorted({tm[t] for t in np.unique(s.atype)} - allowed)
                if extra:
                    raise DataError(f"branch {name!r}: {s.name}: element(s) {', '.join(extra)} not in the branch type map "
                                    f"{sorted(allowed)}")
                if labeled and s.energy is None and s.force is None:
                    raise DataError(f"branch {name!r}: {s.name}: no energy or force labels")
                if not labeled:
                    s.energy = s.force = s.virial = None  # structure only
            parts.append(systems)
        out[name] = (parts[0], parts[1])
    return out


def build_multitask_model(cfg: MultiTaskTrainConfig, train: dict[str, list[System]], stat=None) -> MultiTaskModel:
    """Resolve sel on all branches' training data together, then build the model. `stat`: a
    stats.StatFile caching the neighbour statistic (sel: auto)."""
    type_map = cfg.type_map + ([MASK] if cfg.masks_types else [])
    systems = list(chain(*train.values()))
    counter = neighbor_counter(systems, len(type_map), stat, seed=cfg.training.seed or 0)
    desc = resolve_sel(cfg.descriptor, systems, len(type_map), counter)
    heads = {}
    for name in cfg.branches:
        b = cfg.model.model_dict[name]
        cls = EnergyHeadConfig if b.task == "ener" else DenoiseHeadConfig
        heads[name] = cls(type_map=cfg.branch_type_map(name), fitting_net=b.fitting_net)
    mcfg = MultiTaskModelConfig(type_map=type_map, descriptor=desc, branches=heads,
                                data_stat_nbatch=cfg.model.data_stat_nbatch, data_stat_protect=cfg.model.data_stat_protect)
    return MultiTaskModel(mcfg)


@torch.no_grad()
def fit_multitask_statistics(model: MultiTaskModel, datasets: dict[str, DataSet], log=print, world: int = 1,
                             stat=None) -> dict:
    """Env-matrix stats of the shared descriptor over every branch's data (data_stat_nbatch global
    batches of each; cached in `stat`, a stats.StatFile, keyed by each branch's sample); per-branch
    energy bias."""
    cfg = model.cfg
    dev = next(model.buffers()).device
    nbatch = cfg.data_stat_nbatch * world
    frames = {n: stat_frames(ds, nbatch) for n, ds in datasets.items()}  # the sample stat_samples draws
    key = None if stat is None else stat.key(
        "env-multitask", {n: data_fingerprint(ds.systems, frames[n]) for n, ds in datasets.items()},
        cfg.descriptor.model_dump(mode="json"), cfg.data_stat_protect, len(model.type_map))

    def mask_mean() -> None:  # the MASK pseudo-type is never a centre in the data: give it the mean statistics
        present = sorted({int(t) for ds in datasets.values() for s in ds.systems for t in np.unique(s.atype)})
        for m in model.descriptor.modules():
            if isinstance(m, EnvMatBlock):
                m.mean[cfg.mask_type] = m.mean[present].mean(0)
                m.stddev[cfg.mask_type] = m.stddev[present].mean(0)

    env_stats(model.descriptor, stat, key,
              lambda: [x for n, ds in datasets.items() for x in stat_samples(ds, nbatch, dev, model.dtype, frames[n])],
              cfg.data_stat_protect, log, adjust=mask_mean if cfg.mask_type is not None else None)
    out = {}
    for name in model.energy_branches:  # N b = E - E_net on the branch's data, as stats.fit_statistics
        model.heads[name].out_bias.zero_()
        frames = stat_frames(datasets[name], cfg.data_stat_nbatch * world)  # a bounded sample, as the env stats
        bias, rmse = sampled_energy_bias(model.branch(name), datasets[name], frames, len(model.type_map))
        model.heads[name].out_bias.copy_(torch.as_tensor(bias, dtype=model.dtype))
        used = [i for i, e in enumerate(model.type_map) if e in cfg.branches[name].type_map]
        log(f"{name}: energy bias {dict((model.type_map[i], round(float(bias[i]), 4)) for i in used)}; "
            f"RMSE of energy per atom after linear regression: {rmse:.4g} eV")

        warn_underdetermined_bias(datasets[name].systems, model.type_map, log, prefix=f"{name}: ")
        out[name] = rmse
    return out


def branch_probabilities(cfg: MultiTaskTrainConfig, train: dict[str, list[System]]) -> dict[str, float]:
    """model_prob normalised; default proportional to the number of training frames."""
    w = cfg.training.model_prob or {n: float(sum(s.nframes for s in train[n])) for n in cfg.branches}
    total = sum(w[n] for n in cfg.branches)
    return {n: w[n] / total for n in cfg.branches}


# ----------------------------------------------------------------------------- training


def train_multitask(cfg: MultiTaskTrainConfig, out_dir: str | os.PathLike, *, restart: str | os.PathLike | None = None,
                    log: Callable = print, on_checkpoint: Callable | None = None) -> TrainResult:
    """Multi-task (pre-)training; the checkpoint (kind "multitask") holds every branch.
    `restart`, `on_checkpoint`: as for `trainer.train`."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.training
    set_threads(tcfg.num_threads)
    rank, world, device = distributed.setup(tcfg.device)
    log = log if rank == 0 else (lambda *a, **k: None)
    rng = seed_everything(tcfg.seed)
    data = load_branch_data(cfg)  # DataError before any expensive work
    train_sys = {n: d[0] for n, d in data.items()}

    if restart == "auto":
        restart = out / "model.ckpt" if (out / "model.ckpt").is_file() else None
    payload = read_checkpoint(restart) if restart else None
    if payload is not None:
        if "train_state" not in payload or payload.get("kind") != "multitask":
            raise ConfigError(f"{restart}: not a multi-task checkpoint with training state to restart from")
        model = build_from_payload(payload, str(restart))
        if list(model.cfg.branches) != cfg.branches:
            raise ConfigError(f"{restart}: branches {list(model.cfg.branches)} differ from the config's {cfg.branches}")
    else:
        stats = stat_file(cfg, out, rank)  # training.stat_file, default OUT/stat_file.pt
        model = build_multitask_model(cfg, train_sys, stats)
    model.to(device)
    dtype, reqs = model.dtype, model.nlist_requests()
    sets = {}
    for name, (tr, va) in data.items():
        dd = tcfg.data_dict[name]
        sets[name] = (DataSet(tr, reqs, dd.training_data.batch_size, dtype),
                      DataSet(va, reqs, dd.validation_data.batch_size, dtype) if va else None)
        log(f"{name}: {sets[name][0].nframes} training frames in {len(tr)} systems"
            + (f", {sets[name][1].nframes} validation frames" if va else ""))
    if payload is None:
        fit_multitask_statistics(model, {n: s[0] for n, s in sets.items()}, log, world, stats)
    prob = branch_probabilities(cfg, train_sys)
    tasks = []
    for name in cfg.branches:
        lc = cfg.loss(name)
        loss = EnergyLoss(lc) if lc.type == "ener" else DenoiseLoss(lc, model.cfg.mask_type)
        vd = tcfg.data_dict[name].validation_data
        tasks.append(Task(name, model.branch(name), loss, sets[name][0], sets[name][1], prob[name], vd.numb_btch if vd else 1))
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model: {model.cfg.descriptor.type} shared by {len(tasks)} branches "
        f"({', '.join(f'{t.name} p={t.prob:.3f}' for t in tasks)}), {nparam} parameters, {model.cfg.dtype_name}, device {device}")
    trainer = Trainer(model, tasks, cfg, out, kind="multitask", rng=rng, log=log, rank=rank, world=world,
                      on_checkpoint=on_checkpoint)
    if payload is not None:
        trainer.load_state(payload["train_state"])
        log(f"restarting from {restart} at step {trainer.step}")
    t0, step0 = time.time(), trainer.step
    trainer.run()
    wall = time.time() - t0
    metrics: dict = {"branches": {}}
    if rank == 0:
        coef = trainer.lr(trainer.numb_steps) / cfg.learning_rate.start_lr
        for t in tasks:
            ds = t.valid or t.train
            if t.model.task == "ener":
                metrics["branches"][t.name] = dataset_metrics(t.model, ds)["overall"]
            else:
                metrics["branches"][t.name] = trainer.validate(Task(t.name, t.model, t.loss, t.train, ds, numb_btch=10**9), coef)
        metrics.update({"steps": trainer.numb_steps, "train_wall_s": wall, "n_params": nparam,
                        "steps_per_s": (trainer.numb_steps - step0) / wall if wall > 0 else None})
        atomic_write_text(out / "train.json", json.dumps(metrics, indent=2))
        plot_lcurve(trainer.history, out / "lcurve.png")
    return TrainResult(out, out / "model.ckpt", out / "lcurve.csv", metrics)
