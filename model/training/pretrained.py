"""A pretrained model put to a new use: read it, take its energy model, re-index data onto its
type map, re-fit its energy bias. The one place that does these (fine-tuning, zero-shot tests,
cleaning, active learning and the CLI all call here).

Source: a lamflow checkpoint, a deepmd-kit training checkpoint (.pt, converted on the fly; see
io/deepmd_import.py), or a model already in memory. Branch: one head of a multi-task model (None:
its only energy head). Bias re-fit, change-by-statistic:  Δb = argmin |N Δb - (E - E_model)|, b += Δb
(set-by-statistic for an untrained head: b = argmin |N b - (E - E_net)|), N [nframes, ntypes] atom counts.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Literal

import numpy as np
import torch

from lamflow.model.data.composition import energy_bias
from lamflow.model.data.systems import System, load_systems
from lamflow.model.errors import CheckpointError, ConfigError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint, resolve_device
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.nn.multitask import MultiTaskModel
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.training.bias_check import warn_underdetermined_bias


def source_name(pretrained) -> str:
    return str(pretrained) if isinstance(pretrained, (str, os.PathLike)) else "pretrained model"


def read_model(path: str | os.PathLike, branch: str | None = None):
    """(model, payload) from a lamflow checkpoint or a deepmd-kit one (converted on the fly; `branch`
    picks one head of a multi-task deepmd-kit checkpoint). Any kind of model, in eval mode."""
    payload = read_checkpoint(path, branch=branch)
    return build_from_payload(payload, str(path)).eval(), payload


def stand_alone(pretrained, branch: str | None = None, *, any_kind: bool = False, error: type = ConfigError):
    """The one loader: a stand-alone model from a checkpoint path (lamflow or deepmd-kit) or a model
    (copied): head `branch` of a multi-task model (None: its only energy head), or a single-task
    model itself (branch must be None). any_kind=False: it must be an energy model (fine-tuning,
    zero-shot, cleaning); True: any single-task kind (a compressed model too). Bad branches are
    `error`s naming the source (ConfigError for a config's choice, CheckpointError for a file's)."""
    if isinstance(pretrained, (str, os.PathLike)):
        model = build_from_payload(read_checkpoint(pretrained), str(pretrained))
    else:
        model = copy.deepcopy(pretrained)
    src = source_name(pretrained)
    if isinstance(model, MultiTaskModel):
        try:
            return model.branch_model(branch)
        except ConfigError as e:
            raise error(f"{src}: {e}") from None
    if not any_kind and model.kind != "energy":
        raise ConfigError(f"{src}: zero-shot needs an energy model, got a {model.kind!r} one")
    if branch is not None:
        raise error(f"{src}: a single-task {model.kind + ' ' if any_kind else ''}model has no branch {branch!r}")
    return model


def energy_model(pretrained, branch: str | None = None) -> EnergyModel:
    """A stand-alone energy model from a checkpoint path or a model (copied): a single-task model,
    or head `branch` of a multi-task one (None: its only energy head)."""
    return stand_alone(pretrained, branch)


def load_pretrained(pretrained: str | os.PathLike, branch: str | None = None, device: str = "cpu") -> EnergyModel:
    """The energy model of a checkpoint (see energy_model), on `device`, in eval mode."""
    return energy_model(pretrained, branch).to(resolve_device(device)).eval()


def retype(s: System, type_map: list[str], source: str = "the model", *,
           missing: Literal["raise", "none"] = "raise") -> System | None:
    """`s` with its atom types re-indexed into `type_map` by element name. An element `type_map`
    lacks: a ConfigError naming it and `source` (missing="raise"), or None (missing="none": the
    caller lists such systems instead of evaluating them)."""
    names = [s.elements[t] for t in s.atype]
    absent = sorted(set(names) - set(type_map))
    if absent:
        if missing == "none":
            return None
        raise ConfigError(f"{s.name}: element(s) {', '.join(absent)} not in the type map of {source} {type_map}")
    atype = np.array([type_map.index(n) for n in names], dtype=np.int64)
    return System(s.name, list(type_map), atype, s.coord, s.box, s.energy, s.force, s.virial)


@torch.no_grad()
def change_bias(model: EnergyModel, systems: list[System], keep_head: bool, log: Callable = print) -> np.ndarray:
    """Re-fit out_bias on labelled `systems` (indices into model.type_map): change-by-statistic when
    the head is kept (b += argmin |N db - (E - E_model)|), set-by-statistic on the untrained head's
    residual otherwise (b = argmin |N b - (E - E_net)|). Returns the new bias."""
    ntypes = len(model.type_map)
    old = model.out_bias.detach().cpu().numpy().copy()
    if not keep_head:
        model.out_bias.zero_()
    pred = [evaluate_system(model, s, forces=False, virial=False)["energy"] for s in systems]
    delta, rmse = energy_bias(systems, ntypes, residual=pred)
    new = (old if keep_head else 0.0) + delta
    model.out_bias.copy_(torch.as_tensor(new, dtype=model.out_bias.dtype))
    used = sorted({int(t) for s in systems for t in np.unique(s.atype)})
    names = [model.type_map[t] for t in used]
    how = "change-by-statistic" if keep_head else "set-by-statistic"
    log(f"energy bias of {names} ({how}) from {np.round(old[used], 4).tolist()} to {np.round(new[used], 4).tolist()}; "
        f"RMSE of energy per atom after the fit: {rmse:.4g} eV")
    warn_underdetermined_bias(systems, model.type_map, log)
    return new


def zero_shot(pretrained, systems, branch: str | None = None, log: Callable = lambda *a: None) -> EnergyModel:
    """The pretrained model with only its energy bias re-fitted (change-by-statistic) on `systems`:
    a list of System (any type map: re-indexed by element name) or of paths. `pretrained`: a
    checkpoint path or a model; `branch` picks a multi-task model's head (None: its only one)."""
    model = energy_model(pretrained, branch)
    src = source_name(pretrained)
    tm = list(model.type_map)
    if systems and isinstance(systems[0], System):
        mapped = [retype(s, tm, src) for s in systems]
    else:
        mapped = load_systems(list(systems), tm)
    change_bias(model, [s for s in mapped if s.energy is not None], True, log)
    return model.eval()


def bias_delta(model, systems: list[System]) -> tuple[np.ndarray, list[dict]]:
    """delta b = lstsq(N, E_label - E_model) on `systems` (indexing the model's type map), and the
    model's predictions there before the change (the model is not changed)."""
    if model.kind != "energy":
        raise CheckpointError(f"a bias refit needs a single-task energy model, got kind {model.kind!r}")
    preds = [evaluate_system(model, s, virial=s.virial is not None and s.box is not None) for s in systems]
    delta, _ = energy_bias(systems, len(model.type_map), residual=[p["energy"] for p in preds])
    return delta, preds


def refit_bias(model, systems: list[System]) -> tuple[object, list[dict], np.ndarray]:
    """Copy of `model` with its energy bias refit on `systems` (change-by-statistic, zero_shot) and
    its predictions there. `systems` index the model's type map. Returns (model, predictions, delta b)."""
    refit = zero_shot(model, systems)
    delta = (refit.out_bias - model.out_bias.to(refit.out_bias.device)).detach().cpu().numpy()
    preds = [evaluate_system(refit, s, virial=s.virial is not None and s.box is not None) for s in systems]
    return refit, preds, delta


def load_branch(path: str | os.PathLike, branch: str | None = None, device: str | torch.device = "cpu"):
    """A model from a checkpoint file: branch `branch` of a multi-task model (None: its only energy
    branch), or a single-task model of any kind itself (branch must be None); CheckpointErrors."""
    return stand_alone(path, branch, any_kind=True, error=CheckpointError).to(resolve_device(device)).eval()
