"""Data statistics fitted before training.

- Env-matrix mean/std per centre type (env_mat.py), on up to `data_stat_nbatch` batches per system.
- Per-type energy bias by least squares on composition (deepmd-kit's compute_stats_from_redu):
      N b = E - E_net,   N [nframes, ntypes] atom counts, E [nframes] energies  ->  b [ntypes]
  Types absent from the data get the minimum-norm solution (0).
  E_net is the untrained network's own energy (fitting output without bias). deepmd-kit fits
  the labels alone (E_net = 0) when training from scratch; its untrained fitting net then starts
  with a random offset of 0.1-1.6 eV/atom (seen on CH4 for four seeds) that force-dominated Adam
  steps remove only over hundreds of steps. Subtracting E_net (deepmd-kit's "change-by-statistic",
  which it uses for fine-tuning) starts training unbiased; the model's math is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import DataSet, System
from .potential import extended_inputs


def energy_bias(systems: list[System], ntypes: int, residual: list[np.ndarray] | None = None,
                rcond: float | None = None) -> tuple[np.ndarray, float]:
    """Least-squares per-type bias; with `residual` (per system, per frame), fits E - residual
    instead (deepmd-kit's change-by-statistic when fine-tuning). Returns (bias, rmse per atom)."""
    rows, rhs, nat = [], [], []
    for k, s in enumerate(systems):
        if s.energy is None:
            continue
        rows.append(np.repeat(s.counts(ntypes)[None].astype(float), s.nframes, axis=0))
        rhs.append(s.energy - (0.0 if residual is None else residual[k]))
        nat.append(np.full(s.nframes, s.natoms))
    if not rows:
        return np.zeros(ntypes), float("nan")
    A, y, n = np.concatenate(rows), np.concatenate(rhs), np.concatenate(nat)
    b = np.linalg.lstsq(A, y, rcond=rcond)[0]
    rmse = float(np.sqrt(np.mean(((A @ b - y) / n) ** 2)))
    return b, rmse


def stat_samples(ds: DataSet, nbatch: int, device, dtype):
    """(coord_ext, atype_ext, nlists) for up to nbatch batches of every system."""
    for i, s in enumerate(ds.systems):
        b = ds.batch_sizes[i]
        n = min(s.nframes, nbatch * b)
        for start in range(0, n, b):
            batch = ds.frames(i, range(start, min(start + b, n)), device)
            coord_ext, atype_ext = extended_inputs(batch, dtype)
            yield coord_ext, atype_ext, batch.nlists


@torch.no_grad()
def network_energies(model, ds: DataSet, max_frames: int = 2000) -> list[np.ndarray]:
    """The model's energy of every frame (per system; frames past max_frames reuse the mean)."""
    from .potential import predict

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
def fit_statistics(model, ds: DataSet, nbatch: int, protect: float, log=print) -> dict:
    """Set the descriptor's env-matrix stats and the energy bias from the training data."""
    dev = model.out_bias.device
    model.descriptor.set_stats(list(stat_samples(ds, nbatch, dev, model.dtype)), protect)
    model.out_bias.zero_()
    bias, rmse = energy_bias(ds.systems, len(model.type_map), residual=network_energies(model, ds))
    model.out_bias.copy_(torch.as_tensor(bias, dtype=model.dtype))
    log(f"energy bias per type {dict(zip(model.type_map, np.round(bias, 4).tolist()))}; "
        f"RMSE of energy per atom after linear regression: {rmse:.4g} eV")
    return {"bias_rmse_e_per_atom": rmse}
