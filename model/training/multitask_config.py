"""The multi-task training config (deepmd-kit's multi-task input, doc/train/multi-task-training.md):

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
(`heads.<name>.*`), the lcurve column prefixes and the `--branch` choices."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError

from lamflow.model.errors import ConfigError
from lamflow.model.nn.config import DESCRIPTOR_TAGS, MASK, DenoiseNetConfig, DescriptorConfig, FittingConfig
from lamflow.model.schema import Strict, format_validation_error, strip_comments
from lamflow.model.training.config import (
    DataConfig,
    DenoiseLossConfig,
    LearningRateConfig,
    LossConfig,
    TrainingLoopConfig,
    read_yaml,
)

BRANCH_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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


# the union tags of the multi-task config (descriptor types, branch tasks) and its plain unions' member names
TAGS = frozenset(DESCRIPTOR_TAGS) | {"ener", "denoise", "list[str]", "str"}


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


def parse_multitask_config(raw: Any, source: str = "config") -> MultiTaskTrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = MultiTaskTrainConfig.model_validate(strip_comments(raw))
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e, TAGS)) from None
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
                raise ConfigError(format_validation_error(source, e, TAGS, f"model.shared_dict.{key}").splitlines()[0]) from None
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
    if cfg.masks_types and not cfg.descriptor.mixed_types:
        raise ConfigError(f"{source}: loss_dict: mask_ratio > 0 needs a mixed-type descriptor (se_atten, dpa2, dpa3); "
                          f"{cfg.descriptor.type} sorts neighbours by element and cannot hide one (set mask_ratio: 0)")
