"""Training: one loop for single-task and multi-task runs.

Each step draws a task with probability `prob` (one task for a single-task run), draws a batch
from its training data, and takes one Adam step on that task's loss at lr(step). Every
`disp_freq` steps it evaluates the validation batches, prints one progress line and appends
to `lcurve.csv`; every `save_freq` steps it writes a checkpoint atomically (model + optimizer +
sampler state, so `--restart` continues exactly as an uninterrupted run would).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lamflow.model.data.batch import DataSet
from lamflow.model.data.coverage import observed_elements
from lamflow.model.data.loader import BatchStream, auto_workers, state_dict
from lamflow.model.data.systems import System, load_systems
from lamflow.model.errors import ConfigError, DataError, TrainingError
from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.model.io.files import atomic_save, atomic_write_text
from lamflow.model.io.payload import model_payload
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.network import DTYPES
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.training import distributed
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.data_warnings import warn_suspicious
from lamflow.model.training.distributed import GradAllReduce, ShardedDataSet, broadcast_module, lr_scale, sync_rng
from lamflow.model.training.lcurve import _fmt_cell, _fmt_time, plot_lcurve
from lamflow.model.training.loss import EnergyLoss, ExpDecayLR
from lamflow.model.training.metrics import dataset_metrics
from lamflow.model.training.stats import StatFile, fit_statistics, neighbor_counter, resolve_sel, sample_frames


@dataclass
class Task:
    name: str
    model: nn.Module  # the head this task trains (shares modules with the root model)
    loss: Callable  # (model, batch, coef, training) -> (loss, metrics)
    train: DataSet
    valid: DataSet | None
    prob: float = 1.0
    numb_btch: int = 1


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    lcurve: Path
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- preparation


def load_data(cfg: TrainConfig, labeled: bool = True) -> tuple[list[System], list[System] | None]:
    """Training and validation systems, indexed and validated, frames left on disk."""
    tm = cfg.model.type_map
    td = cfg.training.training_data
    train = load_systems(td.system_list, tm, td.fmt, labeled, lazy=True)
    vd = cfg.training.validation_data
    valid = load_systems(vd.system_list, tm, vd.fmt, labeled, lazy=True) if vd else None
    return train, valid


def stat_file(cfg, out: Path, rank: int = 0) -> StatFile:
    """training.stat_file, default `stat_file.pt` in the output folder."""
    return StatFile(cfg.training.stat_file or out / "stat_file.pt", writable=rank == 0)


def seed_everything(seed: int | None) -> np.random.Generator:
    if seed is not None:
        torch.manual_seed(seed)
    return np.random.default_rng(seed)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, root: nn.Module, tasks: list[Task], cfg: TrainConfig, out_dir: Path, kind: str | None = None,
                 rng: np.random.Generator | None = None, log: Callable = print, rank: int = 0, world: int = 1,
                 extra_payload: dict | None = None, on_checkpoint: Callable[[Path, int], None] | None = None):
        self.root, self.tasks, self.cfg, self.out = root, tasks, cfg, Path(out_dir)
        self.on_checkpoint = on_checkpoint  # called on rank 0 with (checkpoint path, step) after each save
        self.kind, self.log, self.rank, self.world = kind, log, rank, world
        self.extra_payload = extra_payload or {}
        if "trained_elements" not in self.extra_payload:  # "trained on" vs "in the type map" (data/coverage.py)

            self.extra_payload["trained_elements"] = observed_elements([s for t in tasks for s in getattr(t.train, "systems", [])])
            if len(tasks) > 1:
                self.extra_payload["trained_elements_by_branch"] = {t.name: observed_elements(getattr(t.train, "systems", []))
                                                                    for t in tasks}
        self.rng = rng or np.random.default_rng(cfg.training.seed)
        self.numb_steps = cfg.training.numb_steps
        self.lr = ExpDecayLR(cfg.learning_rate, self.numb_steps)
        params = [p for p in root.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=cfg.learning_rate.start_lr, foreach=True)  # one fused update, not a loop over tensors
        self.step = 0
        probs = np.array([t.prob for t in tasks], dtype=float)
        self.task_prob = probs / probs.sum()
        self.history: list[dict] = []
        self.step_hook: Callable | None = None  # called with (step, task, loss) after each step (DDP sync, tests)
        self.train_time, self.timed_steps = 0.0, 0  # training steps (+ display), first 10 excluded, checkpoints not
        self.lr_scale = 1.0
        self.stream: BatchStream | None = None  # the running batch stream (its consumed sampler state is checkpointed)
        nw = cfg.training.num_workers
        self.num_workers = auto_workers(self.device) if nw == "auto" else int(nw)
        if world > 1:  # data parallel (distributed.py): same global batch on every rank, averaged gradients
            for t in tasks:
                t.train = ShardedDataSet(t.train, rank, world)
            broadcast_module(root)
            sync_rng(self.rng)  # the same task and global batch on every rank
            self.step_hook = GradAllReduce(root, world)
            self.lr_scale = lr_scale(cfg.learning_rate.scale_by_worker, world)
            torch.manual_seed(torch.initial_seed() + rank)  # own noise stream per rank (denoise); rank 0 unchanged

    # -- state
    def state(self) -> dict:
        snap = self.stream.consumed if self.stream is not None else None  # the loader runs ahead: save what was used
        if snap is None:
            rng, samplers = self.rng.bit_generator.state, {t.name: t.train.state() for t in self.tasks}
        else:
            rng, samplers = snap["rng"], {t.name: state_dict(s) for t, s in zip(self.tasks, snap["samplers"])}
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "rng": rng,
            "torch_rng": torch.get_rng_state(),
            "samplers": samplers,
            "history": self.history,
        }

    def load_state(self, st: dict) -> None:
        self.step = int(st["step"])
        self.opt.load_state_dict(st["optimizer"])
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        for t in self.tasks:
            t.train.load_state(st["samplers"][t.name])
        self.history = list(st.get("history", []))

    def save(self, path: Path, with_state: bool = True) -> Path:
        extra = dict(self.extra_payload)
        if with_state:
            extra["train_state"] = self.state()
        return atomic_save(model_payload(self.root, self.kind, extra), path)

    # -- evaluation
    def validate(self, task: Task, coef: float) -> dict:
        if task.valid is None:
            return {}
        sums: dict[str, list[float]] = {}
        for k, (_, batch) in enumerate(task.valid.batches()):
            if k >= task.numb_btch:
                break
            batch = batch.to(self.device)
            _, m = task.loss(task.model, batch, coef, False)
            for key, v in m.items():
                sums.setdefault(key, []).append(v)
        return {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in sums.items()}

    @property
    def device(self) -> torch.device:
        return next(self.root.buffers()).device

    # -- main loop
    def run(self) -> list[dict]:
        t0, step0 = time.time(), self.step
        tcfg = self.cfg.training
        lcurve = self.out / "lcurve.csv"
        start_lr = self.cfg.learning_rate.start_lr
        self.stream = BatchStream([t.train for t in self.tasks], self.task_prob, self.rng, self.numb_steps - self.step,
                                  self.device, self.num_workers)
        batches = iter(self.stream)
        while self.step < self.numb_steps:
            step = self.step
            t_step = time.perf_counter()
            lr = self.lr(step)
            for g in self.opt.param_groups:
                g["lr"] = lr * self.lr_scale
            ti, batch = next(batches)  # the task and batch an unbuffered loop would draw now (loader.py)
            task = self.tasks[ti]
            self.root.train()
            loss, metrics = task.loss(task.model, batch, lr / start_lr, True)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"step {step}: loss is {loss.item()} on task {task.name!r} (lr {lr:.3g}); "
                    f"last good checkpoint: {self.out / 'model.ckpt'} — lower start_lr or check the data"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.step_hook is not None:
                self.step_hook(step, task, loss)
            self.opt.step()
            self.step += 1
            last = self.step == self.numb_steps
            if step % tcfg.disp_freq == 0 or last:
                self._display(step, task, loss.item(), metrics, lr, t0, step0, lcurve)
            if step >= 10:  # like deepmd-kit's "average training time", validation at display steps included
                self.train_time += time.perf_counter() - t_step
                self.timed_steps += 1
            if self.rank == 0 and (self.step % tcfg.save_freq == 0 or last):
                self.save(self.out / "model.ckpt")
                if not last:
                    self._keep_numbered()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(self.out / "model.ckpt", self.step)
        self.stream = None
        return self.history

    def _display(self, step, task, loss, metrics, lr, t0, step0, lcurve):
        row = {"step": step, "task": task.name, "loss": loss, "lr": lr}
        row.update({f"{k}_trn": v for k, v in metrics.items()})
        coef = lr / self.cfg.learning_rate.start_lr
        for t in self.tasks:
            val = self.validate(t, coef)
            prefix = "" if len(self.tasks) == 1 else f"{t.name}:"
            row.update({f"{prefix}{k}_val": v for k, v in val.items()})
        done = self.step - step0
        elapsed = time.time() - t0
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.numb_steps - self.step) / rate if rate and rate > 0 else float("nan")
        row["steps_per_s"] = rate
        row["elapsed_s"] = elapsed
        self.history.append(row)
        if self.rank != 0:
            return
        parts = [f"step {step:>6d}/{self.numb_steps}", f"loss {loss:.3e}"]
        parts += [f"{k} {v:.3e}" for k, v in row.items() if k.startswith(("rmse", f"{task.name}:rmse")) or ":rmse" in k]
        parts += [f"lr {lr:.2e}", f"{rate:.2f} steps/s", f"ETA {_fmt_time(eta)}"]
        self.log("  ".join(parts))
        self._write_lcurve(lcurve)

    def _write_lcurve(self, path: Path) -> None:
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        lines = [",".join(keys)]
        for r in self.history:
            lines.append(",".join(_fmt_cell(r.get(k, "")) for k in keys))
        atomic_write_text(path, "\n".join(lines) + "\n")

    def _keep_numbered(self) -> None:
        ckdir = self.out / "checkpoints"
        self.save(ckdir / f"model-{self.step}.ckpt")
        old = sorted(ckdir.glob("model-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
        for p in old[: -self.cfg.training.max_ckpt_keep]:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- single-task entry point


def build_energy_model(cfg: TrainConfig, train_sys: list[System], counter: Callable | None = None) -> EnergyModel:
    ntypes = len(cfg.model.type_map)
    desc = resolve_sel(cfg.model.descriptor, train_sys, ntypes, counter)
    mcfg = cfg.model.model_copy(update={"descriptor": desc})
    return EnergyModel(mcfg)


def check_labels(systems: list[System], cfg: TrainConfig, what: str) -> None:
    loss = EnergyLoss(cfg.loss)
    for s in systems:
        if loss.has_e and s.energy is None and s.force is None:
            raise DataError(f"{s.name}: no energy or force labels for {what}")


def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, restart: str | os.PathLike | None = None,
          init: Callable[[EnergyModel, list[System]], None] | None = None, log: Callable = print,
          on_checkpoint: Callable[[Path, int], None] | None = None) -> TrainResult:
    """Train one energy model. `restart`: a checkpoint with train_state to continue from
    ("auto": out_dir/model.ckpt if it exists). `init(model, train_systems)`: called instead of the
    statistics fit (fine-tuning loads weights and re-fits the bias there). `on_checkpoint(path,
    step)`: called on rank 0 after each checkpoint save (e.g. to copy it to an object store)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.training.num_threads)
    rank, world, device = distributed.setup(cfg.training.device)  # (0, 1, device) unless launched by torchrun
    log = log if rank == 0 else _quiet
    rng = seed_everything(cfg.training.seed)
    train_sys, valid_sys = load_data(cfg)  # DataError before any expensive work
    check_labels(train_sys, cfg, "training")
    warn_suspicious(train_sys, "training", log)  # duplicates, huge forces, energy outliers: one line, then go on

    if restart == "auto":
        restart = out / "model.ckpt" if (out / "model.ckpt").is_file() else None
    payload = read_checkpoint(restart) if restart else None
    if payload is not None:
        if "train_state" not in payload:
            raise ConfigError(f"{restart}: has no training state to restart from (a final or imported model?)")
        model = EnergyModel(ModelConfig.model_validate(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    else:
        stats = stat_file(cfg, out, rank)
        seed = cfg.training.seed or 0
        model = build_energy_model(cfg, train_sys, neighbor_counter(train_sys, len(cfg.model.type_map), stats, seed))
    model.to(device)
    dtype = DTYPES[model.cfg.dtype_name]
    reqs = model.nlist_requests()
    td, vd = cfg.training.training_data, cfg.training.validation_data
    train_ds = DataSet(train_sys, reqs, td.batch_size, dtype)
    valid_ds = DataSet(valid_sys, reqs, vd.batch_size, dtype) if valid_sys else None
    log(f"data: {train_ds.nframes} training frames in {len(train_sys)} systems"
        + (f", {valid_ds.nframes} validation frames" if valid_ds else "") + f"; sel {model.descriptor.nlist_requests()[0].sel}")
    if payload is None:
        if init is not None:
            init(model, train_sys)
        else:
            fit_statistics(model, train_ds, cfg.model.data_stat_nbatch * world, cfg.model.data_stat_protect, log,
                           stats, seed)  # global batches
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model: {model.cfg.descriptor.type}, {nparam} parameters, {model.cfg.dtype_name}, device {device}")
    task = Task("default", model, EnergyLoss(cfg.loss), train_ds, valid_ds, 1.0, vd.numb_btch if vd else 1)
    trainer = Trainer(model, [task], cfg, out, rng=rng, log=log, rank=rank, world=world, on_checkpoint=on_checkpoint)
    if payload is not None:
        trainer.load_state(payload["train_state"])
        log(f"restarting from {restart} at step {trainer.step}")
    t0 = time.time()
    step0 = trainer.step
    trainer.run()
    wall = time.time() - t0
    metrics = final_metrics(model, valid_ds or train_ds)
    metrics.update({"steps": trainer.numb_steps, "train_wall_s": wall,
                    "s_per_step": trainer.train_time / trainer.timed_steps if trainer.timed_steps else None,
                    "steps_per_s": (trainer.numb_steps - step0) / wall if wall > 0 else None, "n_params": nparam})
    if rank == 0:
        atomic_write_text(out / "train.json", json.dumps(metrics, indent=2))
        plot_lcurve(trainer.history, out / "lcurve.png")
    return TrainResult(out, out / "model.ckpt", out / "lcurve.csv", metrics)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


FINAL_FRAMES = 2000  # the closing metrics of a larger dataset come from a random sample of this many frames


def final_metrics(model, ds: DataSet) -> dict:
    if ds.nframes > FINAL_FRAMES:
        frames = sample_frames(ds.systems, [max(1, FINAL_FRAMES // len(ds.systems))] * len(ds.systems))
        sub = DataSet([s.subset(f) for s, f in zip(ds.systems, frames)], ds.requests, 1, ds.dtype)
        sub.set_batch_sizes(ds.batch_sizes)
        ds = sub
    return dataset_metrics(model, ds)["overall"]
