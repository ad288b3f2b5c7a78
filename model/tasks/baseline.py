"""The "dummy" model every error is compared with (LAMBench's normalisation): energy from
composition alone, E(frame) = sum_t n_t(frame) e_t, with the per-element energies e_t fitted by
least squares on the training frames; forces and virials zero. A model that does not beat it
has learned nothing beyond counting atoms.

    base = fit_baseline(train_systems, ntypes)       # e_t [ntypes], eV
    errs = baseline_errors(base, test_systems)       # same keys as lamflow.model.training.metrics.collect
    dataset_baseline(train_paths, valid_paths, type_map)  # the same for one dataset on disk (overall errors)
    ratio(model_rmse, base_rmse)                     # < 1: better than the baseline

Energy RMSEs are per atom, forces per component (eV/A), virials per atom, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lamflow.model.data.systems import System, load_systems
from lamflow.model.training.metrics import collect

# metric keys compared with the baseline (lamflow.model.training.metrics.summarize names)
COMPARED = ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom")


@dataclass
class Baseline:
    e_per_type: np.ndarray  # [ntypes] eV, least-squares per-element energies
    ncompositions: int  # distinct compositions in the fit (1: e_t are not separable, only their sum)

    def energy(self, s: System) -> np.ndarray:  # [nframes] eV
        return np.full(s.nframes, float(s.counts(len(self.e_per_type)) @ self.e_per_type))

    def predict(self, s: System) -> dict:
        out = {"energy": self.energy(s), "force": np.zeros_like(s.coord, dtype=np.float64)}
        if s.virial is not None:
            out["virial"] = np.zeros((s.nframes, 9))
        return out


def fit_baseline(systems: list[System], ntypes: int) -> Baseline:
    """Least-squares per-element energies over every labelled frame of `systems` (minimum-norm
    solution when compositions do not separate the elements)."""
    rows, y = [], []
    for s in systems:
        if s.energy is None:
            continue
        rows.append(np.repeat(s.counts(ntypes)[None].astype(np.float64), s.nframes, axis=0))
        y.append(np.asarray(s.energy, dtype=np.float64))
    if not rows:
        return Baseline(np.zeros(ntypes), 0)
    A, b = np.concatenate(rows), np.concatenate(y)
    e, *_ = np.linalg.lstsq(A, b, rcond=None)
    return Baseline(e, len({tuple(r) for r in A.astype(int).tolist()}))


def baseline_errors(base: Baseline, systems: list[System]) -> dict:
    """The dummy model's errors in lamflow.model.training.metrics.collect's layout."""

    return collect([(s, base.predict(s)) for s in systems])


def dataset_baseline(train: list[str], valid: list[str], type_map: list[str], fmt: str = "auto") -> dict:
    """The dummy model of one dataset: fitted on its `train` systems, its overall errors on the
    `valid` systems (collect()'s "overall" dict, with "nframes"). Frames are read lazily."""
    fit = fit_baseline(load_systems(train, type_map, fmt, lazy=True), len(type_map))
    return baseline_errors(fit, load_systems(valid, type_map, fmt, lazy=True))["overall"]


def ratio(model_value: float | None, base_value: float | None) -> float | None:
    """model / baseline; None when either is missing or the baseline is zero."""
    if model_value is None or base_value is None or base_value <= 0:
        return None
    return float(model_value) / float(base_value)


def normalised(model: dict, base: dict) -> dict:
    """{metric: {"model", "baseline", "ratio"}} for the metrics both have (one system's or the
    overall dict of collect())."""
    return {k: {"model": model[k], "baseline": base[k], "ratio": ratio(model[k], base[k])}
            for k in COMPARED if model.get(k) is not None and base.get(k) is not None}
