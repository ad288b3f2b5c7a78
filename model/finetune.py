"""Fine-tuning a pretrained model on new data (deepmd-kit's `dp train --finetune [--model-branch]`).

Start: the pretrained descriptor (weights, type embedding and env-matrix statistics), and
- a kept head (a single-task model's own, or branch NAME of a multi-task model): its fitting net and
  its bias, re-fitted by "change-by-statistic":   Δb = argmin |N Δb - (E - E_pretrained)|,  b += Δb
- a new random head (branch "RANDOM"; the default for a multi-task model with no branch given): a
  fitting net built from the config's `fitting_net` with bias "set-by-statistic" on the residual of
  the untrained head:  b = argmin |N b - (E - E_net)|  (deepmd-kit fits E alone, E_net = 0; we
  subtract the untrained net's own energy exactly as stats.fit_statistics does when training from
  scratch, so a fine-tune and a from-scratch run start equally unbiased)
(N [nframes, ntypes] atom counts of up to data_stat_nbatch batches per training system), then the
usual training loop (train.train) on the new data; `freeze_descriptor` trains the fitting only.

The model section of the fine-tune config is checked, not used, as in deepmd-kit: the descriptor
(and a kept head's fitting net) come from the checkpoint. Its `type_map` may be any subset of the
pretrained type map; every element of the data must be in the pretrained type map, else a
ConfigError naming the missing elements is raised before anything is built. The fine-tuned model
keeps the full pretrained type map (simplest: no weights to re-index; elements absent from the new
data keep their pretrained descriptor weights and a bias that was never re-fitted).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from .checkpoint import build_from_payload, read_checkpoint
from .config import ModelConfig, TrainConfig
from .data import System, elements_in, load_systems, resolve_batch_size
from .errors import ConfigError
from .potential import EnergyModel
from .stats import energy_bias
from .train import TrainResult, train

RANDOM = "RANDOM"


def load_pretrained(pretrained, branch: str | None = None) -> tuple[EnergyModel, str]:
    """(energy model to start from, head) with head = the kept branch name, "self" for a
    single-task model, or RANDOM (the model then carries the pretrained head, to be replaced)."""
    from .multitask import MultiTaskModel

    if isinstance(pretrained, (str, os.PathLike)):
        model = build_from_payload(read_checkpoint(pretrained), str(pretrained))
        src = str(pretrained)
    else:
        model, src = pretrained, "pretrained model"
    if isinstance(model, MultiTaskModel):
        if branch is None or branch == RANDOM:  # deepmd-kit: no --model-branch means a random head
            desc_only = EnergyModel(ModelConfig(type_map=model.type_map, descriptor=model.cfg.descriptor))
            desc_only.descriptor.load_state_dict(model.descriptor.state_dict())
            return desc_only, RANDOM
        try:
            return model.branch_model(model.resolve_branch(branch)), branch
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
    if getattr(model, "kind", None) != "energy":
        raise ConfigError(f"{src}: a {getattr(model, 'kind', '?')!r} model cannot be fine-tuned (give the model it was made from)")
    if branch not in (None, RANDOM):
        raise ConfigError(f"{src}: a single-task model has no branch {branch!r} (omit --branch, or RANDOM for a new head)")
    return model, RANDOM if branch == RANDOM else "self"


def bias_frames(systems: list[System], nbatch: int, batch_size) -> list[System]:
    """The first nbatch batches of every system (deepmd-kit samples data_stat_nbatch batches)."""
    return [s.subset(np.arange(min(s.nframes, nbatch * resolve_batch_size(batch_size, s.natoms)))) for s in systems]


@torch.no_grad()
def change_bias(model: EnergyModel, systems: list[System], keep_head: bool, log: Callable = print) -> np.ndarray:
    """Re-fit out_bias on labelled `systems` (indices into model.type_map): change-by-statistic when
    the head is kept (b += argmin |N db - (E - E_model)|), set-by-statistic on the untrained head's
    residual otherwise (b = argmin |N b - (E - E_net)|). Returns the new bias."""
    from .infer import evaluate_system

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
    from .bias_check import warn_underdetermined_bias

    warn_underdetermined_bias(systems, model.type_map, log)
    return new


def check_elements(cfg: TrainConfig, type_map: list[str], source: str) -> None:
    """The config's type map and every element of the data must be in the pretrained type map."""
    missing = [e for e in cfg.model.type_map if e not in type_map]
    if missing:
        raise ConfigError(f"model.type_map: element(s) {', '.join(missing)} not in the type map of {source} {type_map}")
    td, vd = cfg.training.training_data, cfg.training.validation_data
    for key, dc in (("training_data", td), ("validation_data", vd)):
        if dc is None:
            continue
        missing = [e for e in elements_in(dc.system_list, dc.fmt) if e not in type_map]
        if missing:
            raise ConfigError(f"training.{key}: the data has element(s) {', '.join(missing)} that {source} does not "
                              f"know (its type map: {type_map}); fine-tuning cannot add elements")


def finetune(cfg: TrainConfig, pretrained: str | os.PathLike, out_dir: str | os.PathLike, *, branch: str | None = None,
             freeze_descriptor: bool = False, restart: str | os.PathLike | None = None,
             log: Callable = print, on_checkpoint: Callable | None = None) -> TrainResult:
    """Fine-tune `pretrained` (a lamflow checkpoint: energy or multitask) on cfg's data; see the
    module docstring. `branch`: a multi-task head, or "RANDOM" for a new one. `restart`: continue an
    interrupted fine-tuning from its checkpoint (as train.train)."""
    base, head = load_pretrained(pretrained, branch)
    src = str(pretrained)
    check_elements(cfg, base.type_map, src)
    keep = head != RANDOM
    desc = base.cfg.descriptor
    if freeze_descriptor:
        if "trainable" not in type(desc).model_fields:
            raise ConfigError(f"--freeze-descriptor: descriptor {desc.type} has no trainable switch")
        desc = desc.model_copy(update={"trainable": False})
    if cfg.model.descriptor.type != desc.type:
        log(f"note: model.descriptor ({cfg.model.descriptor.type}) of the config is ignored; "
            f"the descriptor comes from {src} ({desc.type})")
    mcfg = ModelConfig(type_map=list(base.type_map), descriptor=desc,
                       fitting_net=base.cfg.fitting_net if keep else cfg.model.fitting_net,
                       data_stat_nbatch=cfg.model.data_stat_nbatch, data_stat_protect=cfg.model.data_stat_protect)
    log(f"fine-tuning from {src}: descriptor {desc.type}" + (" (frozen)" if freeze_descriptor else "")
        + (f", head {head if head != 'self' else 'of the pretrained model'} kept" if keep else ", new random head (RANDOM)"))

    def init(model: EnergyModel, train_sys: list[System]) -> None:
        state = {k: v for k, v in base.state_dict().items() if k.startswith("descriptor.")}
        if keep:
            state.update({k: v for k, v in base.state_dict().items() if not k.startswith("descriptor.")})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("descriptor.") for k in missing):
            raise ConfigError(f"{src}: weights do not fit the model built from its config ({(unexpected or missing)[:3]})")
        frames = bias_frames(train_sys, cfg.model.data_stat_nbatch, cfg.training.training_data.batch_size)
        change_bias(model, frames, keep, log)

    return train(cfg.model_copy(update={"model": mcfg}), out_dir, restart=restart, init=init, log=log,
                 on_checkpoint=on_checkpoint)


def energy_model(pretrained, branch: str | None = None) -> EnergyModel:
    """A stand-alone energy model from a checkpoint path or a model (copied): a single-task model,
    or head `branch` of a multi-task one (None: its only energy head)."""
    from .multitask import MultiTaskModel

    if isinstance(pretrained, (str, os.PathLike)):
        model = build_from_payload(read_checkpoint(pretrained), str(pretrained))
    else:
        import copy

        model = copy.deepcopy(pretrained)
    src = str(pretrained) if isinstance(pretrained, (str, os.PathLike)) else "pretrained model"
    if isinstance(model, MultiTaskModel):
        try:
            return model.branch_model(branch)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
    if getattr(model, "kind", None) != "energy":
        raise ConfigError(f"{src}: zero-shot needs an energy model, got a {getattr(model, 'kind', '?')!r} one")
    if branch is not None:
        raise ConfigError(f"{src}: a single-task model has no branch {branch!r}")
    return model


def zero_shot(pretrained, systems, branch: str | None = None, log: Callable = lambda *a: None) -> EnergyModel:
    """The pretrained model with only its energy bias re-fitted (change-by-statistic) on `systems`:
    a list of System (any type map: re-indexed by element name) or of paths. `pretrained`: a
    checkpoint path or a model; `branch` picks a multi-task model's head (None: its only one)."""
    model = energy_model(pretrained, branch)
    src = str(pretrained) if isinstance(pretrained, (str, os.PathLike)) else "pretrained model"
    tm = list(model.type_map)
    if systems and isinstance(systems[0], System):
        mapped = [retype(s, tm, src) for s in systems]
    else:
        mapped = load_systems(list(systems), tm)
    change_bias(model, [s for s in mapped if s.energy is not None], True, log)
    return model.eval()


def retype(s: System, type_map: list[str], source: str = "the model") -> System:
    """`s` with its atom types re-indexed into `type_map` by element name."""
    names = [s.elements[t] for t in s.atype]
    missing = sorted(set(names) - set(type_map))
    if missing:
        raise ConfigError(f"{s.name}: element(s) {', '.join(missing)} not in the type map of {source} {type_map}")
    atype = np.array([type_map.index(n) for n in names])
    return System(s.name, list(type_map), atype, s.coord, s.box, s.energy, s.force, s.virial)
