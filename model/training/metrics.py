"""Errors of a model on labelled systems: energy per atom, force, virial per atom (RMSE and MAE),
per system and overall (frames weight energies and virials, atoms weight forces). The numbers
training prints and tasks/evaluate.py writes."""

from __future__ import annotations

import numpy as np

from lamflow.model.data.batch import DataSet
from lamflow.model.data.systems import System
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.nn.potential import predict


def system_errors(pred: dict, s: System) -> dict:
    """Per-frame error arrays (eV/atom, eV/A components, eV/atom)."""
    out = {}
    if s.energy is not None:
        out["e_per_atom"] = (pred["energy"] - s.energy) / s.natoms
    if s.force is not None and "force" in pred:
        out["f"] = (pred["force"] - s.force).reshape(-1)
    if s.virial is not None and "virial" in pred:
        out["v_per_atom"] = ((pred["virial"] - s.virial) / s.natoms).reshape(-1)
    return out


def summarize(errs: dict, nframes: int, natoms: int) -> dict:
    m = {"nframes": nframes, "natoms": natoms}
    names = {"e_per_atom": "e_per_atom", "f": "f", "v_per_atom": "v_per_atom"}
    for k, name in names.items():
        if k in errs and len(errs[k]):
            e = errs[k]
            m[f"rmse_{name}"] = float(np.sqrt(np.mean(e**2)))
            m[f"mae_{name}"] = float(np.mean(np.abs(e)))
    return m


def collect(per_system: list[tuple[System, dict]]) -> dict:
    systems, pooled = {}, {}
    nf = na = 0
    for s, pred in per_system:
        errs = system_errors(pred, s)
        systems[s.name] = summarize(errs, s.nframes, s.natoms)
        for k, v in errs.items():
            pooled.setdefault(k, []).append(v)
        nf += s.nframes
        na += s.nframes * s.natoms
    overall = summarize({k: np.concatenate(v) for k, v in pooled.items()}, nf, na)
    return {"systems": systems, "overall": overall}


def predict_dataset(model, ds: DataSet) -> list[tuple[System, dict]]:
    device = model.out_bias.device
    acc: dict[int, dict[str, list]] = {}
    for i, batch in ds.batches():
        p = predict(model, batch.to(device), forces=True, virial=batch.box is not None)
        d = acc.setdefault(i, {"energy": [], "force": [], "virial": []})
        d["energy"].append(p.energy.detach().double().cpu().numpy())
        n = ds.systems[i].natoms
        d["force"].append(p.force.detach().double().cpu().numpy()[:, :n])
        if p.virial is not None:
            d["virial"].append(p.virial.detach().double().cpu().numpy())
    return [(ds.systems[i], {k: np.concatenate(v) for k, v in d.items() if v}) for i, d in sorted(acc.items())]


def dataset_metrics(model, ds: DataSet) -> dict:
    return collect(predict_dataset(model, ds))


def predict_systems(model, systems: list[System]) -> list[tuple[System, dict]]:
    return [(s, evaluate_system(model, s, virial=s.virial is not None and s.box is not None)) for s in systems]
