"""Composition: the per-element least-squares energy fit  N b = E  (N [nframes, ntypes] atom
counts, b [ntypes] eV), streamed over the energy files."""

from __future__ import annotations

import numpy as np

from lamflow.model.data.systems import FrameArray, System


def energy_bias(systems: list[System], ntypes: int, residual: list[np.ndarray] | None = None,
                rcond: float | None = None) -> tuple[np.ndarray, float]:
    """Least-squares per-type bias; with `residual` (per system), fits E - residual instead
    (deepmd-kit's change-by-statistic when fine-tuning). Returns (bias, rmse per atom).

    Every frame of a system has the same composition, so the fit over frames equals a weighted
    fit over systems of their mean energies (same normal equations, same minimum-norm solution):
    only each system's count, mean and variance are needed, streamed over the energy files.
    A residual of one value per frame is subtracted frame by frame; a shorter one (the network's
    energies on a sample of the frames) enters by its mean."""
    rows, rhs, w, var, nat = [], [], [], [], []
    for k, s in enumerate(systems):
        if s.energy is None:
            continue
        r = None if residual is None else np.asarray(residual[k], dtype=np.float64).reshape(-1)
        if r is not None and len(r) == s.nframes:
            y = np.asarray(s.energy, dtype=np.float64).reshape(-1) - r
            mean, v = float(y.mean()), float(y.var())
        else:
            mean, v = _mean_var(s.energy)
            mean -= 0.0 if r is None else float(r.mean())
        rows.append(s.counts(ntypes).astype(float))
        rhs.append(mean)
        w.append(float(s.nframes))
        var.append(v)
        nat.append(float(s.natoms))
    if not rows:
        return np.zeros(ntypes), float("nan")
    A, y, w, var, nat = np.array(rows), np.array(rhs), np.array(w), np.array(var), np.array(nat)
    sw = np.sqrt(w)
    b = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=rcond)[0]
    rmse = float(np.sqrt(np.sum(w * ((A @ b - y) ** 2 + var) / nat**2) / w.sum()))
    return b, rmse


def _mean_var(a) -> tuple[float, float]:
    """Mean and variance of a per-frame scalar array, in chunks when it is on disk."""
    if not isinstance(a, FrameArray):
        a = np.asarray(a, dtype=np.float64)
        return float(a.mean()), float(a.var())
    n, total, sq = 0, 0.0, 0.0
    shift = float(a[0])  # shifted sums keep the variance accurate
    for _, block in a.chunks():
        x = np.asarray(block, dtype=np.float64).reshape(-1) - shift
        n, total, sq = n + len(x), total + float(x.sum()), sq + float((x * x).sum())
    mean = total / n
    return mean + shift, max(0.0, sq / n - mean * mean)
