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
usual training loop (trainer.train) on the new data; `freeze_descriptor` trains the fitting only.

The model section of the fine-tune config is checked, not used, as in deepmd-kit: the descriptor
(and a kept head's fitting net) come from the checkpoint, the type map from the config.

Type maps. With a type-embedding descriptor (se_atten, se_atten_v2, dpa2, dpa3: one shared fitting
net) the fine-tuned model's type map is the config's `type_map`, in its order (`change_type_map`):
elements the pretrained model knows keep their type-embedding row A_t, their env-matrix statistics
and their energy bias; new elements get the fresh model's embedding row (random init), statistics
from the new data and bias 0, before the bias fit above; elements only the pretrained model knows
are dropped. The fitting net is shared, so nothing else depends on the type. Every element of the
data must be in the config's type map. With se_e2_a (one net per type pair, typed neighbour lists)
the pretrained type map is kept whole: the config's type map may be any subset of it, and an
element it lacks is a ConfigError naming it, raised before anything is built.

deepmd-kit 3's change_type_map (TypeEmbedNetConsistent, extend_descrpt_stat, the fittings' and
atomic model's out_bias) does the same re-indexing, with these differences: a new element's
embedding row is drawn uniformly in [0, 1) there (here: the layer's own normal init); new elements'
statistics come from a model built on the new data in both, but deepmd-kit refuses a type
embedding with the residual rule (tebd_dim = ntypes or 2 ntypes) unless linear, while here the
embedding table A itself is preserved (rows re-solved for the new residual term); deepmd-kit
also remaps exclude_types, which lamflow does not support.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from lamflow.model.data.batch import DataSet, resolve_batch_size
from lamflow.model.data.systems import System, elements_in
from lamflow.model.errors import ConfigError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint
from lamflow.model.nn.config import DESCRIPTOR_CONFIGS, ModelConfig
from lamflow.model.nn.multitask import MultiTaskModel
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.pretrained import (
    change_bias,
    zero_shot,  # noqa: F401 (workflows/stage_configs.py looks for it here)
)
from lamflow.model.training.stats import stat_samples
from lamflow.model.training.trainer import TrainResult, train

RANDOM = "RANDOM"


def starting_model(pretrained, branch: str | None = None) -> tuple[EnergyModel, str]:
    """(energy model to start from, head) with head = the kept branch name, "self" for a
    single-task model, or RANDOM (the model then carries the pretrained head, to be replaced)."""
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
    if model.kind != "energy":
        raise ConfigError(f"{src}: a {model.kind!r} model cannot be fine-tuned (give the model it was made from)")
    if branch not in (None, RANDOM):
        raise ConfigError(f"{src}: a single-task model has no branch {branch!r} (omit --branch, or RANDOM for a new head)")
    return model, RANDOM if branch == RANDOM else "self"


def bias_frames(systems: list[System], nbatch: int, batch_size) -> list[System]:
    """The first nbatch batches of every system (deepmd-kit samples data_stat_nbatch batches)."""
    return [s.subset(np.arange(min(s.nframes, nbatch * resolve_batch_size(batch_size, s.natoms)))) for s in systems]


def can_add_elements(descriptor_type: str) -> bool:
    """Whether fine-tuning can give a model of this descriptor elements it was not trained on."""

    return DESCRIPTOR_CONFIGS[descriptor_type].mixed_types


def new_elements(type_map: list[str], pretrained_map: list[str]) -> list[str]:
    return [e for e in type_map if e not in pretrained_map]


def check_elements(cfg: TrainConfig, type_map: list[str], source: str, descriptor_type: str = "se_e2_a") -> None:
    """The config's type map and every element of the data must be in the pretrained type map,
    unless the descriptor can add elements; then every element of the data must be in the config's."""
    if can_add_elements(descriptor_type):
        type_map = list(cfg.model.type_map)
        source = "model.type_map"
    missing = new_elements(cfg.model.type_map, type_map)
    if missing:
        raise ConfigError(f"model.type_map: element(s) {', '.join(missing)} not in the type map of {source} {type_map}; "
                          f"{descriptor_type} (one net per type pair) cannot add elements")
    td, vd = cfg.training.training_data, cfg.training.validation_data
    for key, dc in (("training_data", td), ("validation_data", vd)):
        if dc is None:
            continue
        missing = [e for e in elements_in(dc.system_list, dc.fmt) if e not in type_map]
        if missing:
            raise ConfigError(f"training.{key}: the data has element(s) {', '.join(missing)} that {source} does not "
                              f"know (its type map: {type_map})"
                              + ("" if can_add_elements(descriptor_type) else "; fine-tuning cannot add elements"))


def finetune(cfg: TrainConfig, pretrained: str | os.PathLike, out_dir: str | os.PathLike, *, branch: str | None = None,
             freeze_descriptor: bool = False, restart: str | os.PathLike | None = None,
             log: Callable = print, on_checkpoint: Callable | None = None) -> TrainResult:
    """Fine-tune `pretrained` (a lamflow checkpoint: energy or multitask) on cfg's data; see the
    module docstring. `branch`: a multi-task head, or "RANDOM" for a new one. `restart`: continue an
    interrupted fine-tuning from its checkpoint (as trainer.train)."""
    base, head = starting_model(pretrained, branch)
    src = str(pretrained)
    desc = base.cfg.descriptor
    check_elements(cfg, base.type_map, src, desc.type)
    keep = head != RANDOM
    remap = can_add_elements(desc.type)
    type_map = list(cfg.model.type_map) if remap else list(base.type_map)
    if remap and getattr(desc, "type_map", None) is not None:
        desc = desc.model_copy(update={"type_map": type_map})
    if freeze_descriptor:
        if "trainable" not in type(desc).model_fields:
            raise ConfigError(f"--freeze-descriptor: descriptor {desc.type} has no trainable switch")
        desc = desc.model_copy(update={"trainable": False})
    if cfg.model.descriptor.type != desc.type:
        log(f"note: model.descriptor ({cfg.model.descriptor.type}) of the config is ignored; "
            f"the descriptor comes from {src} ({desc.type})")
    mcfg = ModelConfig(type_map=type_map, descriptor=desc,
                       fitting_net=base.cfg.fitting_net if keep else cfg.model.fitting_net,
                       data_stat_nbatch=cfg.model.data_stat_nbatch, data_stat_protect=cfg.model.data_stat_protect)
    log(f"fine-tuning from {src}: descriptor {desc.type}" + (" (frozen)" if freeze_descriptor else "")
        + (f", head {head if head != 'self' else 'of the pretrained model'} kept" if keep else ", new random head (RANDOM)"))
    added = new_elements(type_map, base.type_map)
    if added:
        log(f"new element(s) {', '.join(added)}: fresh type embedding, statistics from the data")

    def init(model: EnergyModel, train_sys: list[System]) -> None:
        source = change_type_map(base, model, train_sys, cfg) if remap else base
        state = {k: v for k, v in source.state_dict().items() if k.startswith("descriptor.")}
        if keep:
            state.update({k: v for k, v in source.state_dict().items() if not k.startswith("descriptor.")})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("descriptor.") for k in missing):
            raise ConfigError(f"{src}: weights do not fit the model built from its config ({(unexpected or missing)[:3]})")
        frames = bias_frames(train_sys, cfg.model.data_stat_nbatch, cfg.training.training_data.batch_size)
        change_bias(model, frames, keep, log)

    return train(cfg.model_copy(update={"model": mcfg}), out_dir, restart=restart, init=init, log=log,
                 on_checkpoint=on_checkpoint)


TYPE_EMBEDDING_MATRIX = "type_embedding.net.layers.0.matrix"  # [ntypes, tebd_dim]: row t is type t's


def type_rows(key: str) -> bool:
    """State-dict entries indexed by type along their first axis (besides the type embedding)."""
    return key in ("out_bias", "fitting.bias_atom_e") or (key.startswith("descriptor.") and key.endswith((".mean", ".stddev")))


@torch.no_grad()
def change_type_map(base: EnergyModel, fresh: EnergyModel, systems: list[System], cfg: TrainConfig | None = None) -> EnergyModel:
    """`base` re-indexed onto fresh.type_map (see the module docstring): a copy of `fresh` with every
    weight of `base`, type-indexed rows taken from `base` for the elements it knows and from `fresh`
    for the others (whose env-matrix statistics are first computed on `systems`). The type
    embedding table A (not just the first-layer matrix) is what is kept, since the residual rule of
    that layer depends on the number of types."""
    import copy

    new_map, old_map = list(fresh.type_map), list(base.type_map)
    out = copy.deepcopy(fresh)
    idx = [old_map.index(e) if e in old_map else -1 for e in new_map]
    dev = out.out_bias.device  # the fresh model may already sit on the training device, `base` on the CPU
    known = torch.tensor([i >= 0 for i in idx], device=dev)
    src = torch.tensor([max(i, 0) for i in idx], device=dev)
    if not known.all():  # statistics of the new elements from the new data, as training from scratch would
        nbatch = cfg.model.data_stat_nbatch if cfg else 10
        ds = DataSet(systems, out.nlist_requests(), cfg.training.training_data.batch_size if cfg else "auto", out.dtype)
        out.descriptor.set_stats(list(stat_samples(ds, nbatch, out.out_bias.device, out.dtype)),
                                 cfg.model.data_stat_protect if cfg else 1e-2)
    state, ours = base.state_dict(), out.state_dict()
    new_state = {}
    for key, value in ours.items():
        if type_rows(key):
            rows = state[key].to(value)[src]
            mask = known.view(-1, *([1] * (value.dim() - 1)))
            new_state[key] = torch.where(mask, rows, value)
        elif key.endswith(TYPE_EMBEDDING_MATRIX):
            prefix = key[: -len(TYPE_EMBEDDING_MATRIX)]
            old_table = base.get_submodule(prefix + "type_embedding").table()[:-1].to(value)  # [n_old, tebd]
            new_emb = out.get_submodule(prefix + "type_embedding")
            table = torch.where(known[:, None], old_table[src], new_emb.table()[:-1])  # kept rows, fresh rows
            layer = new_emb.net.layers[0]
            bias_key = key[: -len("matrix")] + "bias"
            bias = state[bias_key].to(value) if bias_key in state else 0.0
            residual = new_emb.table()[:-1] - layer.matrix - (layer.bias if layer.bias is not None else 0.0)
            new_state[key] = table - bias - residual  # so that the new layer reproduces `table`
        else:
            if key not in state or state[key].shape != value.shape:
                raise ConfigError(f"weight {key} of the pretrained model does not fit the re-indexed model")
            new_state[key] = state[key]
    out.load_state_dict(new_state)
    return out


