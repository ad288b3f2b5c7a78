"""Multi-task pre-training: one shared descriptor, one head per dataset ("branch").

    D_i      = descriptor(structure)                      shared by every branch (type embedding included)
    E^b_i    = F^b_{t_i}(D_i) + out_bias^b[t_i]           energy branch b: its own fitting net and bias
    dx^b_i   = denoise head^b(descriptor output)          denoise branch (denoise.py)
Each training step draws ONE branch b with probability model_prob[b] (default: proportional to
its number of training frames), a batch of b's data, and takes an Adam step on b's loss; the
shared descriptor thus learns from every dataset while each head keeps its own energy
reference (DFT codes, pseudopotentials and functionals differ by ~100 eV/atom).

Statistics: the env-matrix mean/std of the shared descriptor pool all branches' data; each
energy branch's bias is the least-squares fit of ITS data's energies on composition (on the
residual of its untrained head, as stats.fit_statistics does for a single-task model). The
neighbour statistic (sel: auto) and the env-matrix statistics are cached in the stat file
(`training.stat_file`, default OUT/stat_file.pt), keyed by every branch's sample, as single-task.

The config mirrors deepmd-kit's multi-task input (doc/train/multi-task-training.md):

    model:
      shared_dict: {type_map_all: [O, H, Si], my_descriptor: {type: se_atten, ...}}
      model_dict:
        water: {type_map: type_map_all, descriptor: my_descriptor, fitting_net: {neuron: [64, 64]}}
        si:    {type_map: type_map_all, descriptor: my_descriptor, fitting_net: {neuron: [64, 64]}}
        noise: {task: denoise, descriptor: my_descriptor, fitting_net: {neuron: [32]}}
    loss_dict: {water: {start_pref_e: 0.02, ...}, noise: {type: denoise, noise: 0.2, mask_ratio: 0.15}}
    training:
      model_prob: {water: 1.0, si: 1.0, noise: 0.5}       # optional
      data_dict: {water: {training_data: {systems: ...}, validation_data: {...}}, ...}
      numb_steps: ..., seed: ..., disp_freq: ...

A string in model_dict names a shared_dict entry; every branch must use the same descriptor
(the shared one). A branch's type_map may be a subset of the shared type map (the model keeps
the shared one: the union of all branches' type maps); every element of a branch's data must be
in the branch's type map. Branch names are also the names of checkpoint entries
(`heads.<name>.*`), the lcurve column prefixes and the `--branch` choices.
"""

from __future__ import annotations

import json
import os
import re
import time
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import numpy as np
import torch
from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError
from torch import Tensor, nn

from lamflow.model.data.batch import DataSet
from lamflow.model.data.systems import System, load_systems
from lamflow.model.errors import CheckpointError, ConfigError, DataError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint
from lamflow.model.io.files import atomic_write_text
from lamflow.model.nn.config import DESCRIPTOR_TAGS, DescriptorConfig, FittingConfig, ModelConfig
from lamflow.model.nn.descriptor import REGISTRY, build_descriptor
from lamflow.model.nn.descriptor.base import EnvMatBlock
from lamflow.model.nn.descriptor_config import dtype_name
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.network import DTYPES
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.schema import Strict, error_lines, strip_comments
from lamflow.model.training import distributed
from lamflow.model.training.config import DataConfig, LearningRateConfig, LossConfig, TrainingLoopConfig, read_yaml
from lamflow.model.training.denoise import MASK, DenoiseHead, DenoiseLoss, DenoiseLossConfig, DenoiseNetConfig, denoise_dtype
from lamflow.model.training.lcurve import plot_lcurve
from lamflow.model.training.loss import EnergyLoss
from lamflow.model.training.stats import (
    data_fingerprint,
    neighbor_counter,
    resolve_sel,
    sampled_energy_bias,
    stat_buffers,
    stat_frames,
    stat_samples,
)
from lamflow.model.training.trainer import Task, Trainer, TrainResult, seed_everything, set_threads, stat_file

BRANCH_TAGS = frozenset(DESCRIPTOR_TAGS) | {"ener", "denoise"}  # left out of error locations
BRANCH_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------- the user's config


def _tag(key: str, default: str):
    return lambda v: v.get(key, default) if isinstance(v, dict) else getattr(v, key, default)


class EnergyBranchSpec(Strict):
    task: Literal["ener"] = "ener"
    type_map: Union[str, list[str], None] = None  # a shared_dict key or a list; None: the only type map there
    descriptor: Union[str, None] = None  # a shared_dict key; None: the only descriptor there
    fitting_net: FittingConfig = FittingConfig()


class DenoiseBranchSpec(Strict):
    task: Literal["denoise"]
    type_map: Union[str, list[str], None] = None
    descriptor: Union[str, None] = None
    fitting_net: DenoiseNetConfig = DenoiseNetConfig()


BranchSpec = Annotated[
    Union[Annotated[EnergyBranchSpec, Tag("ener")], Annotated[DenoiseBranchSpec, Tag("denoise")]],
    Discriminator(_tag("task", "ener")),
]
LossSpec = Annotated[
    Union[Annotated[LossConfig, Tag("ener")], Annotated[DenoiseLossConfig, Tag("denoise")]],
    Discriminator(_tag("type", "ener")),
]


class MultiTaskModelSpec(Strict):
    shared_dict: dict[str, Any]  # name -> type map (list of elements) or descriptor config
    model_dict: dict[str, BranchSpec]
    data_stat_nbatch: int = Field(10, gt=0)
    data_stat_protect: float = 1e-2


class BranchData(Strict):
    training_data: DataConfig
    validation_data: DataConfig | None = None


class MultiTrainingConfig(TrainingLoopConfig):
    """`training` of a multi-task run: TrainingConfig with data_dict (and model_prob) instead of
    training_data / validation_data."""

    data_dict: dict[str, BranchData]
    model_prob: dict[str, float] | None = None  # relative weights; None: proportional to training frames


class MultiTaskTrainConfig(Strict):
    model: MultiTaskModelSpec
    learning_rate: LearningRateConfig = LearningRateConfig()
    loss_dict: dict[str, LossSpec] = {}
    training: MultiTrainingConfig

    # -- resolved views (valid after `check`)
    @property
    def branches(self) -> list[str]:
        return list(self.model.model_dict)

    def loss(self, name: str) -> LossConfig | DenoiseLossConfig:
        task = self.model.model_dict[name].task
        return self.loss_dict.get(name) or (LossConfig() if task == "ener" else DenoiseLossConfig())

    def _only(self, what: type) -> str:
        """The key of the only shared_dict entry of this kind (list: a type map, dict: a descriptor)."""
        return [k for k, v in self.model.shared_dict.items() if isinstance(v, what)][0]

    def branch_type_map(self, name: str) -> list[str]:
        tm = self.model.model_dict[name].type_map
        if isinstance(tm, list):
            return tm
        return list(self.model.shared_dict[tm or self._only(list)])

    @property
    def type_map(self) -> list[str]:
        """The shared type map: shared_dict's type map(s), then any element only a branch lists."""
        out: list[str] = []
        shared = [v for v in self.model.shared_dict.values() if isinstance(v, list)]
        for tm in shared + [self.branch_type_map(n) for n in self.branches]:
            out += [e for e in tm if e not in out]
        return out

    @property
    def descriptor(self):
        key = self.model.model_dict[self.branches[0]].descriptor or self._only(dict)
        return TypeAdapter(DescriptorConfig).validate_python(self.model.shared_dict[key])

    @property
    def masks_types(self) -> bool:
        return any(self.loss(n).type == "denoise" and self.loss(n).mask_ratio > 0 for n in self.branches)


def is_multitask_config(raw: Any) -> bool:
    """A raw (YAML-loaded) config is multi-task when its model has a model_dict."""
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "model_dict" in raw["model"]


def multitask_layout(config: dict, heads: dict[str, dict], type_map: list[str], threads: int = 0) -> dict:
    """Single-model settings (a pipeline's pretrain stage) and each head's data ({"train", "valid",
    "fmt"}) -> deepmd-kit's multi-task layout: one shared descriptor
    (`model.descriptor`), one energy branch per dataset with `model.fitting_net`, the same loss
    for every branch, and `training` with a data_dict. `model.model_prob` is not a key here:
    `training.model_prob` (optional) weights the branches. `config["denoise"]` (head -> {loss,
    fitting_net}) makes those heads denoise branches (task denoise, loss type denoise)."""
    model = dict(config.get("model") or {})
    tr = {k: v for k, v in (config.get("training") or {}).items() if k not in ("training_data", "validation_data")}
    td = (config.get("training") or {}).get("training_data") or {}
    vd = (config.get("training") or {}).get("validation_data") or {}
    data_dict = {}
    for name, h in heads.items():
        d = {"training_data": {**td, "systems": h["train"], "fmt": h["fmt"]}}
        if h["valid"]:
            d["validation_data"] = {**vd, "systems": h["valid"], "fmt": h["fmt"]}
        data_dict[name] = d
    if threads and "num_threads" not in tr:
        tr["num_threads"] = int(threads)
    extra = {k: model[k] for k in ("data_stat_nbatch", "data_stat_protect") if k in model}
    model_dict = {name: {"type_map": "type_map_all", "descriptor": "descriptor", "fitting_net": model.get("fitting_net", {})}
                  for name in heads}
    loss_dict = {name: config.get("loss") or {} for name in heads}
    for name, dn in (config.get("denoise") or {}).items():
        model_dict[name] = {"task": "denoise", "type_map": "type_map_all", "descriptor": "descriptor",
                            "fitting_net": dn.get("fitting_net") or {}}
        loss_dict[name] = {"type": "denoise", **(dn.get("loss") or {})}
    return {
        "model": {"shared_dict": {"type_map_all": list(model.get("type_map") or type_map), "descriptor": model.get("descriptor", {})},
                  "model_dict": model_dict, **extra},
        "learning_rate": config.get("learning_rate") or {},
        "loss_dict": loss_dict,
        "training": {**tr, "data_dict": data_dict},
    }


def _format(source: str, err: ValidationError, prefix: str = "") -> str:
    return "\n".join(error_lines(source, err, prefix, tags=BRANCH_TAGS))


def parse_multitask_config(raw: Any, source: str = "config") -> MultiTaskTrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = MultiTaskTrainConfig.model_validate(strip_comments(raw))
    except ValidationError as e:
        raise ConfigError(_format(source, e)) from None
    check(cfg, source)
    return cfg


def load_multitask_config(path: str | os.PathLike) -> MultiTaskTrainConfig:
    """Read and validate a multi-task config; relative data paths are resolved against its folder."""
    path = Path(path)
    cfg = parse_multitask_config(read_yaml(path), str(path))

    def fix(dc: DataConfig | None) -> DataConfig | None:
        if dc is None:
            return None
        return dc.model_copy(update={"systems": [str(p if Path(p).is_absolute() else path.parent / p) for p in dc.system_list]})

    data = {k: v.model_copy(update={"training_data": fix(v.training_data), "validation_data": fix(v.validation_data)})
            for k, v in cfg.training.data_dict.items()}
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"data_dict": data})})


def check(cfg: MultiTaskTrainConfig, source: str) -> None:
    """Cross-section checks, each a one-line ConfigError with the key path."""
    shared, branches = cfg.model.shared_dict, cfg.branches
    if not branches:
        raise ConfigError(f"{source}: model.model_dict: no branch")
    for key, v in shared.items():
        if isinstance(v, list):
            if not v or not all(isinstance(e, str) for e in v) or len(set(v)) != len(v):
                raise ConfigError(f"{source}: model.shared_dict.{key}: a type map must be a non-empty list of distinct elements")
            if MASK in v:
                raise ConfigError(f"{source}: model.shared_dict.{key}: {MASK!r} is reserved for the denoise mask token")
        elif isinstance(v, dict):
            try:
                TypeAdapter(DescriptorConfig).validate_python(v)
            except ValidationError as e:
                raise ConfigError(_format(source, e, f"model.shared_dict.{key}").splitlines()[0]) from None
        else:
            raise ConfigError(f"{source}: model.shared_dict.{key}: expected a type map (list) or a descriptor (mapping)")
    descriptors = set()
    for name, b in cfg.model.model_dict.items():
        where = f"{source}: model.model_dict.{name}"
        if not BRANCH_NAME.match(name):
            raise ConfigError(f"{where}: a branch name may hold only letters, digits, '_' and '-'")
        if isinstance(b.type_map, str) and not isinstance(shared.get(b.type_map), list):
            raise ConfigError(f"{where}.type_map: {b.type_map!r} is not a type map in model.shared_dict")
        if b.type_map is None and len([v for v in shared.values() if isinstance(v, list)]) != 1:
            raise ConfigError(f"{where}.type_map: missing (model.shared_dict holds no single type map to default to)")
        if isinstance(b.type_map, list):
            if len(set(b.type_map)) != len(b.type_map):
                raise ConfigError(f"{where}.type_map: repeated elements")
            known = {e for v in shared.values() if isinstance(v, list) for e in v}
            extra = [e for e in b.type_map if known and e not in known]
            if extra:
                raise ConfigError(f"{where}.type_map: element(s) {', '.join(extra)} not in the shared type map")
        if b.descriptor is None:
            keys = [k for k, v in shared.items() if isinstance(v, dict)]
            if len(keys) != 1:
                raise ConfigError(f"{where}.descriptor: missing (model.shared_dict holds no single descriptor to default to)")
            descriptors.add(keys[0])
        elif not isinstance(shared.get(b.descriptor), dict):
            raise ConfigError(f"{where}.descriptor: {b.descriptor!r} is not a descriptor in model.shared_dict")
        else:
            descriptors.add(b.descriptor)
        lc = cfg.loss_dict.get(name)
        if lc is not None and (lc.type == "denoise") != (b.task == "denoise"):
            raise ConfigError(f"{source}: loss_dict.{name}.type: {lc.type!r} does not fit a branch with task {b.task!r}")
        if name not in cfg.training.data_dict:
            raise ConfigError(f"{source}: training.data_dict: no data for branch {name!r}")
    if len(descriptors) != 1:
        raise ConfigError(f"{source}: model.model_dict: branches use different descriptors {sorted(descriptors)}; "
                          "a multi-task model shares one")
    for key, section in (("loss_dict", cfg.loss_dict), ("training.data_dict", cfg.training.data_dict),
                         ("training.model_prob", cfg.training.model_prob or {})):
        for name in section:
            if name not in cfg.model.model_dict:
                raise ConfigError(f"{source}: {key}.{name}: no such branch in model.model_dict ({', '.join(branches)})")
    prob = cfg.training.model_prob
    if prob is not None:
        for name in branches:
            if name not in prob:
                raise ConfigError(f"{source}: training.model_prob: no weight for branch {name!r}")
            if prob[name] < 0:
                raise ConfigError(f"{source}: training.model_prob.{name}: must be >= 0")
        if sum(prob.values()) <= 0:
            raise ConfigError(f"{source}: training.model_prob: weights sum to 0")
    if cfg.masks_types and not REGISTRY[cfg.descriptor.type].mixed_types:
        raise ConfigError(f"{source}: loss_dict: mask_ratio > 0 needs a mixed-type descriptor (se_atten, dpa2, dpa3); "
                          f"{cfg.descriptor.type} sorts neighbours by element and cannot hide one (set mask_ratio: 0)")


# ----------------------------------------------------------------------------- the model


class EnergyHeadConfig(Strict):
    task: Literal["ener"] = "ener"
    type_map: list[str]  # the elements of this branch (a subset of the model's type map)
    fitting_net: FittingConfig


class DenoiseHeadConfig(Strict):
    task: Literal["denoise"] = "denoise"
    type_map: list[str]
    fitting_net: DenoiseNetConfig


HeadConfig = Annotated[Union[EnergyHeadConfig, DenoiseHeadConfig], Field(discriminator="task")]


class MultiTaskModelConfig(Strict):
    """What a multi-task checkpoint stores: the resolved model (sel counted, references replaced)."""

    type_map: list[str]  # shared elements, then MASK when a denoise branch masks types
    descriptor: DescriptorConfig
    branches: dict[str, HeadConfig]
    data_stat_nbatch: int = 10
    data_stat_protect: float = 1e-2

    @property
    def elements(self) -> list[str]:
        return [e for e in self.type_map if e != MASK]

    @property
    def mask_type(self) -> int | None:
        return self.type_map.index(MASK) if MASK in self.type_map else None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.descriptor.precision)


class EnergyHead(nn.Module):
    def __init__(self, cfg: FittingConfig, dim_in: int, ntypes: int, mixed_types: bool, dtype: torch.dtype):
        super().__init__()
        self.fitting = EnergyFitting(cfg, dim_in, ntypes, mixed_types)
        self.register_buffer("out_bias", torch.zeros(ntypes, dtype=dtype))


def pair_feature_dim(descriptor) -> int:
    """Width M of DescriptorOutput.pair_feat, from one forward on a two-atom structure (any descriptor)."""
    coord = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=next(descriptor.buffers()).dtype)
    atype = torch.zeros(1, 2, dtype=torch.long)
    nlists = []
    for req in descriptor.nlist_requests():
        nl = torch.full((1, 2, req.nnei), -1, dtype=torch.long)
        nl[0, 0, 0], nl[0, 1, 0] = 1, 0
        nlists.append(nl)
    with torch.no_grad():
        return int(descriptor(coord, atype, nlists).pair_feat.shape[-1])


class MultiTaskModel(nn.Module):
    """Shared descriptor + one head per branch (`heads.<name>`). `branch(name)` is the view the
    losses and the trainer use; `branch_model(name)` extracts a stand-alone EnergyModel."""

    kind = "multitask"  # checkpoint kind (checkpoint.KINDS)

    def __init__(self, cfg: MultiTaskModelConfig):
        super().__init__()
        self.cfg = cfg
        self.type_map = list(cfg.type_map)
        ntypes = len(self.type_map)
        self.descriptor = build_descriptor(cfg.descriptor, ntypes)
        dtype = DTYPES[cfg.dtype_name]
        self.heads = nn.ModuleDict()
        for name, h in cfg.branches.items():
            if h.task == "ener":
                self.heads[name] = EnergyHead(h.fitting_net, self.descriptor.dim_out, ntypes, self.descriptor.mixed_types, dtype)
            else:
                self.heads[name] = DenoiseHead(h.fitting_net, self.descriptor.dim_out, pair_feature_dim(self.descriptor),
                                               len(cfg.elements), denoise_dtype(h.fitting_net, dtype))

    @classmethod
    def from_config(cls, config: dict) -> "MultiTaskModel":
        return cls(MultiTaskModelConfig.model_validate(config))

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype_name]

    @property
    def energy_branches(self) -> list[str]:
        return [n for n, h in self.cfg.branches.items() if h.task == "ener"]

    def nlist_requests(self):
        return self.descriptor.nlist_requests()

    def atomic_energy(self, name: str, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                      mapping: Tensor | None = None) -> Tensor:
        """Branch `name`'s atomic energies [nf, nloc] (0 on padding); mapping [nf, nall] as EnergyModel's."""
        nloc = nlists[0].shape[1]
        atype = atype_ext[:, :nloc]
        head = self.heads[name]
        d = self.descriptor(coord_ext, atype_ext, nlists, mapping=mapping)
        return head.fitting(d.descriptor, atype) + head.out_bias[atype.clamp(min=0)] * (atype >= 0)

    def denoise(self, name: str, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                mapping: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Branch `name`'s displacement [nf, nloc, 3] and type logits [nf, nloc, n_elements]."""
        d = self.descriptor(coord_ext, atype_ext, nlists, mapping=mapping)
        return self.heads[name](d)

    def branch(self, name: str) -> "Branch":
        self._check_branch(name)
        return Branch(self, name)

    def branch_model(self, name: str | None = None) -> EnergyModel:
        """Energy branch `name` as a stand-alone EnergyModel (a copy of the shared descriptor and
        of the head, on the same device); None picks the only energy branch."""
        name = self.resolve_branch(name)
        h = self.cfg.branches[name]
        mcfg = ModelConfig(type_map=self.type_map, descriptor=self.cfg.descriptor, fitting_net=h.fitting_net,
                           data_stat_nbatch=self.cfg.data_stat_nbatch, data_stat_protect=self.cfg.data_stat_protect)
        model = EnergyModel(mcfg)
        head = self.heads[name]
        state = {f"descriptor.{k}": v for k, v in self.descriptor.state_dict().items()}
        state.update({f"fitting.{k}": v for k, v in head.fitting.state_dict().items()})
        state["out_bias"] = head.out_bias
        model.load_state_dict(state)
        return model.to(head.out_bias.device)

    def resolve_branch(self, name: str | None) -> str:
        if name is None:
            if len(self.energy_branches) != 1:
                raise ConfigError(f"a multi-task model: choose a branch ({', '.join(self.energy_branches)})")
            return self.energy_branches[0]
        self._check_branch(name)
        if self.cfg.branches[name].task != "ener":
            raise ConfigError(f"branch {name!r} is a {self.cfg.branches[name].task} head, not an energy model "
                              f"(energy branches: {', '.join(self.energy_branches)})")
        return name

    def _check_branch(self, name: str) -> None:
        if name not in self.cfg.branches:
            raise ConfigError(f"no branch {name!r} in this model (branches: {', '.join(self.cfg.branches)})")


class Branch:
    """One head of a MultiTaskModel seen as a model: what the losses, the trainer and evaluation
    call (`atomic_energy`, `denoise`, `dtype`, `type_map`, `out_bias`). It holds no weights of its
    own, so it never goes stale when the root moves to another device."""

    def __init__(self, root: MultiTaskModel, name: str):
        self.root, self.name = root, name
        self.task = root.cfg.branches[name].task

    @property
    def dtype(self) -> torch.dtype:
        return self.root.dtype

    @property
    def type_map(self) -> list[str]:
        return self.root.type_map

    @property
    def out_bias(self) -> Tensor:
        """An energy branch's bias (evaluation also reads the device from it)."""
        return self.root.heads[self.name].out_bias

    def nlist_requests(self):
        return self.root.nlist_requests()

    def atomic_energy(self, coord_ext, atype_ext, nlists, mapping=None):
        return self.root.atomic_energy(self.name, coord_ext, atype_ext, nlists, mapping)

    def denoise(self, coord_ext, atype_ext, nlists, mapping=None):
        return self.root.denoise(self.name, coord_ext, atype_ext, nlists, mapping)


def load_branch(path: str | os.PathLike, branch: str | None = None, device: str | torch.device = "cpu") -> EnergyModel:
    """An energy model from a checkpoint: branch `branch` of a multi-task model (None: its only
    energy branch), or a single-task model itself (branch must be None)."""
    from lamflow.model.io.checkpoint import resolve_device

    model = build_from_payload(read_checkpoint(path), str(path))
    if isinstance(model, MultiTaskModel):
        try:
            model = model.branch_model(branch)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
    elif branch is not None:
        raise CheckpointError(f"{path}: a single-task {getattr(model, 'kind', 'energy')} model has no branch {branch!r}")
    return model.to(resolve_device(device)).eval()


# ----------------------------------------------------------------------------- data, build, statistics


def load_branch_data(cfg: MultiTaskTrainConfig) -> dict[str, tuple[list[System], list[System] | None]]:
    """Every branch's (train, valid) systems on the shared type map; a DataError names the branch
    and the elements its type map lacks. Denoise branches read structures only (labels ignored)."""
    tm = cfg.type_map
    out = {}
    for name in cfg.branches:
        labeled = cfg.model.model_dict[name].task == "ener"
        allowed = set(cfg.branch_type_map(name))
        dd = cfg.training.data_dict[name]
        parts = []
        for dc in (dd.training_data, dd.validation_data):
            if dc is None:
                parts.append(None)
                continue
            try:
                systems = load_systems(dc.system_list, tm, dc.fmt, labeled, lazy=True)
            except DataError as e:
                raise DataError(f"branch {name!r}: {e}") from None
            for s in systems:
                extra = sorted({tm[t] for t in np.unique(s.atype)} - allowed)
                if extra:
                    raise DataError(f"branch {name!r}: {s.name}: element(s) {', '.join(extra)} not in the branch type map "
                                    f"{sorted(allowed)}")
                if labeled and s.energy is None and s.force is None:
                    raise DataError(f"branch {name!r}: {s.name}: no energy or force labels")
                if not labeled:
                    s.energy = s.force = s.virial = None  # structure only
            parts.append(systems)
        out[name] = (parts[0], parts[1])
    return out


def build_multitask_model(cfg: MultiTaskTrainConfig, train: dict[str, list[System]], stat=None) -> MultiTaskModel:
    """Resolve sel on all branches' training data together, then build the model. `stat`: a
    stats.StatFile caching the neighbour statistic (sel: auto)."""
    type_map = cfg.type_map + ([MASK] if cfg.masks_types else [])
    systems = list(chain(*train.values()))
    counter = neighbor_counter(systems, len(type_map), stat, seed=cfg.training.seed or 0)
    desc = resolve_sel(cfg.descriptor, systems, len(type_map), counter)
    heads = {}
    for name in cfg.branches:
        b = cfg.model.model_dict[name]
        cls = EnergyHeadConfig if b.task == "ener" else DenoiseHeadConfig
        heads[name] = cls(type_map=cfg.branch_type_map(name), fitting_net=b.fitting_net)
    mcfg = MultiTaskModelConfig(type_map=type_map, descriptor=desc, branches=heads,
                                data_stat_nbatch=cfg.model.data_stat_nbatch, data_stat_protect=cfg.model.data_stat_protect)
    return MultiTaskModel(mcfg)


@torch.no_grad()
def fit_multitask_statistics(model: MultiTaskModel, datasets: dict[str, DataSet], log=print, world: int = 1,
                             stat=None) -> dict:
    """Env-matrix stats of the shared descriptor over every branch's data (data_stat_nbatch global
    batches of each; cached in `stat`, a stats.StatFile, keyed by each branch's sample); per-branch
    energy bias."""
    cfg = model.cfg
    dev = next(model.buffers()).device
    nbatch = cfg.data_stat_nbatch * world
    frames = {n: stat_frames(ds, nbatch) for n, ds in datasets.items()}  # the sample stat_samples draws
    key = None if stat is None else stat.key(
        "env-multitask", {n: data_fingerprint(ds.systems, frames[n]) for n, ds in datasets.items()},
        cfg.descriptor.model_dump(mode="json"), cfg.data_stat_protect, len(model.type_map))
    cached = None if stat is None else stat.get(key)
    bufs = stat_buffers(model.descriptor)
    if cached is not None and set(cached) == set(bufs):
        for k, v in cached.items():
            bufs[k].copy_(v)
        log(f"env-matrix statistics from {stat.path}")
    else:
        samples = [x for n, ds in datasets.items() for x in stat_samples(ds, nbatch, dev, model.dtype, frames[n])]
        model.descriptor.set_stats(samples, cfg.data_stat_protect)
    if cfg.mask_type is not None:  # the MASK pseudo-type is never a centre in the data: give it the mean statistics
        present = sorted({int(t) for ds in datasets.values() for s in ds.systems for t in np.unique(s.atype)})
        for m in model.descriptor.modules():
            if isinstance(m, EnvMatBlock):
                m.mean[cfg.mask_type] = m.mean[present].mean(0)
                m.stddev[cfg.mask_type] = m.stddev[present].mean(0)
    if stat is not None and cached is None:
        stat.put(key, {k: v.detach().cpu().clone() for k, v in bufs.items()})
    out = {}
    for name in model.energy_branches:  # N b = E - E_net on the branch's data, as stats.fit_statistics
        model.heads[name].out_bias.zero_()
        frames = stat_frames(datasets[name], cfg.data_stat_nbatch * world)  # a bounded sample, as the env stats
        bias, rmse = sampled_energy_bias(model.branch(name), datasets[name], frames, len(model.type_map))
        model.heads[name].out_bias.copy_(torch.as_tensor(bias, dtype=model.dtype))
        used = [i for i, e in enumerate(model.type_map) if e in cfg.branches[name].type_map]
        log(f"{name}: energy bias {dict((model.type_map[i], round(float(bias[i]), 4)) for i in used)}; "
            f"RMSE of energy per atom after linear regression: {rmse:.4g} eV")
        from lamflow.model.training.bias_check import warn_underdetermined_bias

        warn_underdetermined_bias(datasets[name].systems, model.type_map, log, prefix=f"{name}: ")
        out[name] = rmse
    return out


def branch_probabilities(cfg: MultiTaskTrainConfig, train: dict[str, list[System]]) -> dict[str, float]:
    """model_prob normalised; default proportional to the number of training frames."""
    w = cfg.training.model_prob or {n: float(sum(s.nframes for s in train[n])) for n in cfg.branches}
    total = sum(w[n] for n in cfg.branches)
    return {n: w[n] / total for n in cfg.branches}


# ----------------------------------------------------------------------------- training


def train_multitask(cfg: MultiTaskTrainConfig, out_dir: str | os.PathLike, *, restart: str | os.PathLike | None = None,
                    log: Callable = print, on_checkpoint: Callable | None = None) -> TrainResult:
    """Multi-task (pre-)training; the checkpoint (kind "multitask") holds every branch.
    `restart`, `on_checkpoint`: as for `train.train`."""
    from lamflow.model.training.metrics import dataset_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.training
    set_threads(tcfg.num_threads)
    rank, world, device = distributed.setup(tcfg.device)
    log = log if rank == 0 else (lambda *a, **k: None)
    rng = seed_everything(tcfg.seed)
    data = load_branch_data(cfg)  # DataError before any expensive work
    train_sys = {n: d[0] for n, d in data.items()}

    if restart == "auto":
        restart = out / "model.ckpt" if (out / "model.ckpt").is_file() else None
    payload = read_checkpoint(restart) if restart else None
    if payload is not None:
        if "train_state" not in payload or payload.get("kind") != "multitask":
            raise ConfigError(f"{restart}: not a multi-task checkpoint with training state to restart from")
        model = build_from_payload(payload, str(restart))
        if list(model.cfg.branches) != cfg.branches:
            raise ConfigError(f"{restart}: branches {list(model.cfg.branches)} differ from the config's {cfg.branches}")
    else:
        stats = stat_file(cfg, out, rank)  # training.stat_file, default OUT/stat_file.pt
        model = build_multitask_model(cfg, train_sys, stats)
    model.to(device)
    dtype, reqs = model.dtype, model.nlist_requests()
    sets = {}
    for name, (tr, va) in data.items():
        dd = tcfg.data_dict[name]
        sets[name] = (DataSet(tr, reqs, dd.training_data.batch_size, dtype),
                      DataSet(va, reqs, dd.validation_data.batch_size, dtype) if va else None)
        log(f"{name}: {sets[name][0].nframes} training frames in {len(tr)} systems"
            + (f", {sets[name][1].nframes} validation frames" if va else ""))
    if payload is None:
        fit_multitask_statistics(model, {n: s[0] for n, s in sets.items()}, log, world, stats)
    prob = branch_probabilities(cfg, train_sys)
    tasks = []
    for name in cfg.branches:
        lc = cfg.loss(name)
        loss = EnergyLoss(lc) if lc.type == "ener" else DenoiseLoss(lc, model.cfg.mask_type)
        vd = tcfg.data_dict[name].validation_data
        tasks.append(Task(name, model.branch(name), loss, sets[name][0], sets[name][1], prob[name], vd.numb_btch if vd else 1))
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model: {model.cfg.descriptor.type} shared by {len(tasks)} branches "
        f"({', '.join(f'{t.name} p={t.prob:.3f}' for t in tasks)}), {nparam} parameters, {model.cfg.dtype_name}, device {device}")
    trainer = Trainer(model, tasks, cfg, out, kind="multitask", rng=rng, log=log, rank=rank, world=world,
                      on_checkpoint=on_checkpoint)
    if payload is not None:
        trainer.load_state(payload["train_state"])
        log(f"restarting from {restart} at step {trainer.step}")
    t0, step0 = time.time(), trainer.step
    trainer.run()
    wall = time.time() - t0
    metrics: dict = {"branches": {}}
    if rank == 0:
        coef = trainer.lr(trainer.numb_steps) / cfg.learning_rate.start_lr
        for t in tasks:
            ds = t.valid or t.train
            if t.model.task == "ener":
                metrics["branches"][t.name] = dataset_metrics(t.model, ds)["overall"]
            else:
                metrics["branches"][t.name] = trainer.validate(Task(t.name, t.model, t.loss, t.train, ds, numb_btch=10**9), coef)
        metrics.update({"steps": trainer.numb_steps, "train_wall_s": wall, "n_params": nparam,
                        "steps_per_s": (trainer.numb_steps - step0) / wall if wall > 0 else None})
        atomic_write_text(out / "train.json", json.dumps(metrics, indent=2))
        plot_lcurve(trainer.history, out / "lcurve.png")
    return TrainResult(out, out / "model.ckpt", out / "lcurve.csv", metrics)
