"""Data statistics fitted before training, from a bounded random sample of every system.

The sample does not grow with the data (deepmd-kit's `data_stat_nbatch`): the frames of
`data_stat_nbatch` batches drawn at random from each system (`stat_frames`), and for the
neighbour statistic (`sel: auto`, `min_nbor_dist`) up to NEIGHBOR_FRAMES random frames per
system (deepmd-kit's neighbour stat reads every frame; a frame met later with more neighbours
than sel stops training with a DataError naming it). Results are cached in a stat file
(`StatFile`, deepmd-kit's `stat_file`; default next to the output) keyed by what they depend on
(data files, sample, cutoff, descriptor config), so a rerun, a retried step or another stage on
the same data reuses them instead of reading the data again.

- Env-matrix mean/std per centre type (env_mat.py), on the `stat_frames` sample.
- Per-type energy bias by least squares on composition (deepmd-kit's compute_stats_from_redu), on
  every frame's energy label (streamed; one number per frame) and the network's energies of the sample:
      N b = E - E_net,   N [nframes, ntypes] atom counts, E [nframes] energies  ->  b [ntypes]
  Types absent from the data get the minimum-norm solution (0).
  E_net is the untrained network's own energy (fitting output without bias). deepmd-kit fits
  the labels alone (E_net = 0) when training from scratch; its untrained fitting net then starts
  with a random offset of 0.1-1.6 eV/atom (seen on CH4 for four seeds) that force-dominated Adam
  steps remove only over hundreds of steps. Subtracting E_net (deepmd-kit's "change-by-statistic",
  which it uses for fine-tuning) starts training unbiased; the model's math is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lamflow.model.data.batch import DataSet, max_neighbor_counts, overlap_error
from lamflow.model.data.composition import energy_bias
from lamflow.model.data.neighbor import find_pairs, neighbor_counts
from lamflow.model.data.systems import OVERLAP, FrameArray, System
from lamflow.model.io.files import atomic_save
from lamflow.model.nn.descriptor import REGISTRY
from lamflow.model.nn.potential import extended_inputs, predict
from lamflow.model.training.bias_check import warn_underdetermined_bias

NEIGHBOR_FRAMES = 256  # frames per system for the neighbour statistic (sel: auto, min_nbor_dist)


def stat_frames(ds: DataSet, nbatch: int, seed: int = 0) -> list[np.ndarray]:
    """Per system, the sorted frame indices of nbatch random batches (all frames of a small system).
    Depends on nbatch x batch size only, so a DDP run (world x nbatch batches of batch/world) samples
    the same frames as one process."""
    return sample_frames(ds.systems, [nbatch * b for b in ds.batch_sizes], seed)


def sample_frames(systems: list[System], sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # its own stream: the training rng is not touched
    out = []
    for s, n in zip(systems, sizes):
        n = min(s.nframes, int(n))
        out.append(np.arange(s.nframes) if n >= s.nframes else np.sort(rng.choice(s.nframes, size=n, replace=False)))
    return out


def neighbor_frames(systems: list[System], seed: int = 0) -> list[np.ndarray]:
    return sample_frames(systems, [NEIGHBOR_FRAMES] * len(systems), seed)


def sample_batches(ds: DataSet, frames: list[np.ndarray], device):
    """(system, Batch on device) over the sampled frames, in batches of each system's size."""
    for i, ks in enumerate(frames):
        b = ds.batch_sizes[i]
        for start in range(0, len(ks), b):
            yield i, ds.frames(i, ks[start : start + b], device)


def stat_samples(ds: DataSet, nbatch: int, device, dtype, frames: list[np.ndarray] | None = None):
    """(coord_ext, atype_ext, nlists) for nbatch random batches of every system (or `frames`)."""
    for _, batch in sample_batches(ds, stat_frames(ds, nbatch) if frames is None else frames, device):
        coord_ext, atype_ext = extended_inputs(batch, dtype)
        yield coord_ext, atype_ext, batch.nlists


@torch.no_grad()
def network_energies(model, ds: DataSet, max_frames: int = 2000) -> list[np.ndarray]:
    """The model's energy of every frame (per system; frames past max_frames reuse the mean)."""

    dev = model.out_bias.device
    out: list[list[np.ndarray]] = [[] for _ in ds.systems]
    seen = [0] * len(ds.systems)
    for i, batch in ds.batches():
        if seen[i] >= max_frames:
            continue
        out[i].append(predict(model, batch.to(dev), forces=False).energy.double().cpu().numpy())
        seen[i] += batch.nframes
    res = []
    for s, parts in zip(ds.systems, out):
        e = np.concatenate(parts)
        res.append(np.concatenate([e, np.full(s.nframes - len(e), e.mean())]) if len(e) < s.nframes else e)
    return res


@torch.no_grad()
def sampled_energy_bias(model, ds: DataSet, frames: list[np.ndarray], ntypes: int) -> tuple[np.ndarray, float]:
    """energy_bias of E - E_net: the labels of every frame (one number each, streamed), the model's
    own (bias-free) energies E_net on the sampled frames only (a forward pass each)."""

    dev = model.out_bias.device
    e_net: list[list[np.ndarray]] = [[] for _ in ds.systems]
    for i, batch in sample_batches(ds, frames, dev):
        e_net[i].append(predict(model, batch, forces=False).energy.double().cpu().numpy())
    keep = [i for i, s in enumerate(ds.systems) if s.energy is not None and len(frames[i])]
    return energy_bias([ds.systems[i] for i in keep], ntypes, residual=[np.concatenate(e_net[i]) for i in keep])


def stat_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The env-matrix statistics a descriptor holds (every EnvMatBlock's mean and stddev)."""
    return {k: v for k, v in module.named_buffers() if k.endswith(("mean", "stddev"))}


@torch.no_grad()
def env_stats(descriptor, stat: "StatFile | None", key, samples: Callable[[], list], protect: float, log=print,
              adjust: Callable[[], None] | None = None) -> None:
    """The descriptor's env-matrix statistics from the stat file under `key` when it holds them,
    else from `samples()` (then `adjust()`, e.g. for a pseudo-type no frame has), stored under
    `key` for the next run."""
    bufs = stat_buffers(descriptor)
    cached = None if stat is None else stat.get(key)
    if cached is not None and set(cached) == set(bufs):
        for k, v in cached.items():
            bufs[k].copy_(v)
        log(f"env-matrix statistics from {stat.path}")
        return
    descriptor.set_stats(samples(), protect)
    if adjust is not None:
        adjust()
    if stat is not None:
        stat.put(key, {k: v.detach().cpu().clone() for k, v in bufs.items()})


def fit_statistics(model, ds: DataSet, nbatch: int, protect: float, log=print, stat: "StatFile | None" = None,
                   seed: int = 0) -> dict:
    """Set the descriptor's env-matrix stats and the energy bias from a sample of the training data."""
    dev = model.out_bias.device
    frames = stat_frames(ds, nbatch, seed)
    key = None if stat is None else stat.key("env", data_fingerprint(ds.systems, frames),
                                               model.descriptor.cfg.model_dump(mode="json"), protect)
    env_stats(model.descriptor, stat, key, lambda: list(stat_samples(ds, nbatch, dev, model.dtype, frames)), protect, log)
    model.out_bias.zero_()
    bias, rmse = sampled_energy_bias(model, ds, frames, len(model.type_map))
    model.out_bias.copy_(torch.as_tensor(bias, dtype=model.dtype))
    log(f"energy bias per type {dict(zip(model.type_map, np.round(bias, 4).tolist()))} (network energies of "
        f"{sum(map(len, frames))} sampled frames); RMSE of energy per atom after linear regression: {rmse:.4g} eV")

    warn_underdetermined_bias(ds.systems, model.type_map, log)
    return {"bias_rmse_e_per_atom": rmse}


# ----------------------------------------------------------------------------- neighbour statistic


def neighbor_stat(systems: list[System], frames: list[np.ndarray], rcut: float, ntypes: int
                  ) -> tuple[np.ndarray, int, float]:
    """(max neighbours per type, max total, min pair distance) within rcut over the sampled frames.
    Two atoms closer than OVERLAP is a DataError naming the system and frame."""
    per_type = np.zeros(ntypes, dtype=np.int64)
    total, dmin = 0, np.inf
    for s, ks in zip(systems, frames):
        for k in ks:
            k = int(k)
            p = find_pairs(s.coord[k], None if s.box is None else s.box[k], rcut)
            if len(p.d):
                m = int(np.argmin(p.d))
                if p.d[m] < OVERLAP:
                    raise overlap_error(s.name, k, int(p.i[m]), int(p.mapping[p.j[m]]), float(p.d[m]))
                dmin = min(dmin, float(p.d[m]))
            c = neighbor_counts(p, s.atype, s.natoms, ntypes, rcut)
            per_type = np.maximum(per_type, c.max(axis=0))
            total = max(total, int(c.sum(axis=1).max()))
    return per_type, total, dmin


def neighbor_counter(systems: list[System], ntypes: int, stat: "StatFile | None" = None, seed: int = 0):
    """counter(rcut) -> (per-type max, total max) for descriptor.resolve_sel, from the neighbour
    sample, cached in the stat file."""
    frames = neighbor_frames(systems, seed)
    fp = data_fingerprint(systems, frames)

    def counter(rcut: float):
        key = None if stat is None else stat.key("neighbor", fp, float(rcut), ntypes)
        hit = None if stat is None else stat.get(key)
        if hit is None:
            per_type, total, dmin = neighbor_stat(systems, frames, rcut, ntypes)
            hit = {"per_type": per_type.tolist(), "total": int(total), "min_dist": dmin}
            if stat is not None:
                stat.put(key, hit)
        return np.asarray(hit["per_type"], dtype=np.int64), np.int64(hit["total"])

    return counter


# ----------------------------------------------------------------------------- stat file


def data_fingerprint(systems: list[System], frames: list[np.ndarray]) -> str:
    """What the statistics of a sample depend on: every system's files (path, size, mtime) or
    in-memory arrays, and the sampled frames."""
    h = hashlib.sha256()
    for s, ks in zip(systems, frames):
        h.update(f"{s.name}|{s.nframes}|{s.atype.tobytes().hex()}|{np.asarray(ks).tobytes().hex()}".encode())
        for a in (s.coord, s.box, s.energy, s.force, s.virial):
            if isinstance(a, FrameArray):
                for part in a.parts:
                    if isinstance(part, np.ndarray):
                        h.update(part.tobytes())
                    else:
                        st = os.stat(part.path)
                        h.update(f"{os.path.abspath(part.path)}|{st.st_size}|{st.st_mtime_ns}".encode())
            elif a is not None:
                h.update(np.asarray(a).tobytes())
            h.update(b"|")
    return h.hexdigest()


class StatFile:
    """Cached statistics (deepmd-kit's stat_file): one torch file of {key: entry}, written atomically,
    read with weights_only=True; an unreadable file is ignored (recomputed)."""

    def __init__(self, path: str | os.PathLike, writable: bool = True):
        self.path, self.writable = Path(path), writable  # under DDP only rank 0 writes
        self.entries: dict = {}
        if self.path.is_file():
            try:
                self.entries = dict(torch.load(self.path, weights_only=True))
            except Exception:
                self.entries = {}

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        if self.writable:
            atomic_save(self.entries, self.path)


def resolve_sel(desc_cfg, systems: list[System], ntypes: int, counter: Callable | None = None):
    """Replace sel "auto"/"auto:r" by counts from the data (deepmd-kit's neighbour stat): every
    frame, or `counter(rcut)` (stats.neighbor_counter: a sample, cached in the stat file)."""

    cls = REGISTRY[desc_cfg.type]
    return cls.resolve_sel(desc_cfg, counter or (lambda rcut: max_neighbor_counts(systems, rcut, ntypes)))
