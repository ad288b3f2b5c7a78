"""Model compression (DP-Compress, Lu et al., JCTC 18, 5559 (2022)): a trained se_e2_a energy model ->
a CompressedModel (nn/compressed.py) whose embedding nets are tables (nn/tables.py: the math),
evaluated by the fused path (nn/fused.py); the table range comes from the closest pair of the
training data (min_nbor_dist); `compare` checks the compressed model against the original."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lamflow.model.data.batch import min_neighbor_distance
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import CheckpointError, ConfigError, DataError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint, resolve_device
from lamflow.model.io.payload import save_model
from lamflow.model.nn.compressed import CompressedModel, CompressedModelConfig, TabulatedSeE2A
from lamflow.model.nn.descriptor_config import SeE2AConfig
from lamflow.model.nn.infer import evaluate
from lamflow.model.nn.tables import table_grids
from lamflow.model.training.config import load_train_config


def compress_model(model, min_nbor_dist: float, stride: float = 0.01, extrapolate: float = 5.0,
                   check_frequency: int = -1) -> CompressedModel:
    """Tabulate an se_e2_a EnergyModel (statistics must already be set)."""
    desc = model.descriptor
    if not isinstance(getattr(model.cfg, "descriptor", None), SeE2AConfig) or model.kind != "energy":
        what = getattr(getattr(model.cfg, "descriptor", None), "type", model.kind)  # a compressed model's cfg has none
        raise ConfigError(f"compression supports se_e2_a energy models only, got {what!r}")
    if not (stride > 0 and extrapolate >= 1 and min_nbor_dist > 0):
        raise ConfigError(f"compression needs stride > 0, extrapolate >= 1 and min_nbor_dist > 0 "
                          f"(got {stride}, {extrapolate}, {min_nbor_dist})")
    grids = table_grids(desc.cfg, desc.env.mean, desc.env.stddev, desc.ntypes, min_nbor_dist, stride, extrapolate)
    cfg = CompressedModelConfig(model=model.cfg, min_nbor_dist=min_nbor_dist, stride=stride, extrapolate=extrapolate,
                                check_frequency=check_frequency, tables=grids)
    out = CompressedModel(cfg).to(model.out_bias.device)
    out.descriptor = TabulatedSeE2A.from_se_e2a(desc, grids, stride, check_frequency)
    out.fitting.load_state_dict(model.fitting.state_dict())
    out.out_bias.copy_(model.out_bias)
    return out.eval()


# ----------------------------------------------------------------------------- entry point


@dataclass
class CompressResult:
    checkpoint: Path
    min_nbor_dist: float
    tables: int  # number of tables (embedding nets)
    rows: int  # polynomial rows over all tables
    seconds: float
    check: dict  # max |E_compressed - E| per atom and |F| difference on sample frames, when data was given


def resolve_min_nbor_dist(payload: dict, rcut: float, type_map: list[str], training_data: list[str] | str | None,
                          min_nbor_dist: float | None, fmt: str = "auto", log: Callable = print):
    """Explicit value, else from the data (a training config's training_data or system paths),
    else the value stored in the checkpoint; returns (distance, systems or None)."""
    systems = None
    if training_data:
        systems = _load_training_data(training_data, type_map, fmt)
    if min_nbor_dist is not None:
        return float(min_nbor_dist), systems
    if systems is not None:
        d = min_neighbor_distance(systems, rcut)
        if not math.isfinite(d):
            raise DataError(f"{training_data}: no pair of atoms closer than rcut {rcut}; give --min-nbor-dist")
        log(f"min_nbor_dist {d:.4f} A from {sum(s.nframes for s in systems)} frames")
        return d, systems
    if payload.get("min_nbor_dist"):
        return float(payload["min_nbor_dist"]), None
    raise ConfigError("min_nbor_dist unknown: the checkpoint does not store it; give the training data (-t DATA_OR_CONFIG) "
                      "or --min-nbor-dist")


def _load_training_data(spec: list[str] | str, type_map: list[str], fmt: str):
    paths = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if len(paths) == 1 and Path(paths[0]).is_file() and Path(paths[0]).suffix in (".yaml", ".yml", ".json"):
        cfg = load_train_config(paths[0])
        td = cfg.training.training_data
        return load_systems(td.system_list, type_map, td.fmt, labeled=False)
    return load_systems(paths, type_map, fmt, labeled=False)


def compress(model_path: str | os.PathLike, out_path: str | os.PathLike, *, stride: float = 0.01, extrapolate: float = 5.0,
             check_frequency: int = -1, training_data: list[str] | str | None = None, min_nbor_dist: float | None = None,
             fmt: str = "auto", device: str = "cpu", log: Callable = print) -> CompressResult:
    """`lamflow compress`: tabulate the se_e2_a model in model_path and save a "compressed" checkpoint.
    `device`: where the tables are built and checked ("auto": a GPU when there is one)."""
    t0 = time.time()
    payload = read_checkpoint(model_path)
    if payload.get("kind", "energy") != "energy":
        raise CheckpointError(f"{model_path}: a {payload.get('kind')!r} model; compression takes a single se_e2_a energy model")
    desc = payload["config"].get("descriptor", {})
    if desc.get("type") not in ("se_e2_a", "se_a"):
        raise ConfigError(f"{model_path}: compression supports se_e2_a only, this model's descriptor is {desc.get('type')!r}")
    if not (stride > 0 and extrapolate >= 1):
        raise ConfigError(f"stride must be > 0 and extrapolate >= 1 (got {stride}, {extrapolate})")
    d, systems = resolve_min_nbor_dist(payload, float(desc.get("rcut", 6.0)), payload["type_map"], training_data,
                                       min_nbor_dist, fmt, log)
    model = build_from_payload(payload, str(model_path)).to(resolve_device(device)).eval()
    cm = compress_model(model, d, stride, extrapolate, check_frequency)
    check = {}
    if systems:
        check = compare(model, cm, systems)
        log(f"check on {check['frames']} frames: max |dE| {check['max_abs_de_per_atom']:.2e} eV/atom, "
            f"max |dF| {check['max_abs_df']:.2e} eV/A")
    # the uncompressed model travels along (tensors only), so `lamflow export-deepmd` can hand deepmd-kit
    # the embedding nets themselves plus the settings for `dp compress`; coverage of the model it was made from
    parent = {k: v for k, v in payload.items() if k != "train_state"}
    kept = {k: payload[k] for k in ("trained_elements",) if k in payload}
    path = save_model(cm.cpu(), out_path, extra={"min_nbor_dist": d, "parent": parent, **kept})
    rows = cm.descriptor.coef.shape[1]
    log(f"compressed {len(cm.cfg.tables)} embedding nets into {rows} rows (stride {stride}, extrapolate {extrapolate}, "
        f"min_nbor_dist {d:.4f} A) -> {path}")
    return CompressResult(path, d, len(cm.cfg.tables), rows, time.time() - t0, check)


def compare(model, compressed, systems, frames_per_system: int = 2) -> dict:
    """Largest energy-per-atom and force differences between a model and its compressed form."""

    de, df, n = 0.0, 0.0, 0
    for s in systems:
        k = np.linspace(0, s.nframes - 1, min(frames_per_system, s.nframes)).round().astype(int)
        box = None if s.box is None else s.box[k]
        a = evaluate(model, s.coord[k], box, s.atype, virial=False)
        b = evaluate(compressed, s.coord[k], box, s.atype, virial=False)
        de = max(de, float(np.abs(a["energy"] - b["energy"]).max() / s.natoms))
        df = max(df, float(np.abs(a["force"] - b["force"]).max()))
        n += len(k)
    return {"frames": n, "max_abs_de_per_atom": de, "max_abs_df": df}
