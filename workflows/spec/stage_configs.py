"""Stage settings owned by lamflow.model modules: which stages this build can run, and their
configs validated with the model's own pydantic classes (errors carry the pipeline's YAML path)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import Annotated, Optional

from pydantic import BaseModel, ValidationError

from lamflow.model.errors import LamflowError

from .base import as_list, format_errors, is_s3, spec_source
from .schema import PipelineSpec
from .settings import finetune_settings, model_settings

# stage -> (module, what it must provide)
MODULES = {
    "clean": ("lamflow.model.tasks.clean", ("clean", "CleanConfig")),
    "finetune": ("lamflow.model.training.finetune", ("finetune", "zero_shot")),
    "distill": ("lamflow.model.tasks.distill", ("distill", "DistillConfig")),
    "compress": ("lamflow.model.tasks.compress", ("compress",)),
}


def module(stage: str):
    """The model module a stage needs, or None when this build does not have it."""
    name, attrs = MODULES[stage]
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    return mod if all(hasattr(mod, a) for a in attrs) else None


def available(stage: str, load: bool = True) -> bool:
    """load=False: only whether the module file exists (no import, so no torch)."""
    if stage not in MODULES:
        return True
    if not load:
        return _exists(MODULES[stage][0])
    return module(stage) is not None


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def multitask_available() -> bool:
    return _exists("lamflow.model.training.multitask")


def validate_config(cls: type[BaseModel], raw: dict, source: str, path: str) -> tuple[BaseModel | None, list[str]]:
    try:
        return cls.model_validate(raw), []
    except ValidationError as e:
        return None, format_errors(source, e, path)


def problems(spec: PipelineSpec, load: bool = True) -> list[str]:
    """Stages this build cannot run, and (load=True) clean/distill settings validated by the model's
    own config classes."""
    source = spec_source(spec)
    out: list[str] = []
    for stage in spec.stages.enabled():
        if not available(stage, load):
            out.append(f"{source}: stages.{stage}: this build of lamflow has no {MODULES[stage][0]}; "
                       f"disable the stage (enabled: false)")
    st = spec.stages
    if st.pretrain.enabled and (len(st.pretrain.datasets) > 1 or st.pretrain.denoise) and not multitask_available():
        out.append(f"{source}: stages.pretrain.datasets: multi-task pretraining (lamflow.model.training.multitask) is not in "
                   "this build; name one dataset")
    if load and st.clean.enabled and available("clean"):
        out += validate_config(module("clean").CleanConfig, dict(st.clean.config), source, "stages.clean.config")[1]
    if load and st.distill.enabled and available("distill"):
        out += validate_config(module("distill").DistillConfig, dict(st.distill.config), source, "stages.distill.config")[1]
    if st.compress.enabled:
        unknown = sorted(set(st.compress.config) - COMPRESS_KEYS)
        if unknown:
            out.append(f"{source}: stages.compress.config: unknown key(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(COMPRESS_KEYS))})")
        elif load and available("compress"):
            out += validate_config(compress_settings(), dict(st.compress.config), source, "stages.compress.config")[1]
    return out


COMPRESS_KEYS = {"stride", "extrapolate", "check_frequency", "min_nbor_dist"}


def compress_settings() -> type[BaseModel]:
    """The compress stage's settings as a pydantic model whose fields are those of the compressed
    checkpoint's own config (lamflow.model.nn.compressed.CompressedModelConfig): the same bounds the
    stage applies (stride > 0, extrapolate >= 1, min_nbor_dist > 0), not a second rule set."""
    from pydantic import ConfigDict, create_model

    fields = module("compress").CompressedModelConfig.model_fields
    spec = {k: (f.annotation, f) for k, f in fields.items() if k in COMPRESS_KEYS and k != "min_nbor_dist"}
    mnd = fields["min_nbor_dist"]
    spec["min_nbor_dist"] = (Optional[Annotated[(float, *mnd.metadata)]], None)  # optional here: else from the data
    return create_model("CompressSettings", __config__=ConfigDict(extra="forbid", frozen=True), **spec)


def sel_problems(spec: PipelineSpec, dataset: str, where: str, systems: list, type_map: list[str]) -> list[str]:
    """Frames of `dataset` (one split, loaded) whose neighbours exceed the fixed `sel` of a
    training stage that reads it, from a bounded sample (lamflow.model.training.data_warnings.sel_overflow)."""
    from lamflow.model.training.data_warnings import sel_overflow

    st = spec.stages
    stages = []
    if st.pretrain.enabled and dataset in st.pretrain.datasets:
        stages.append(("pretrain", lambda: model_settings(st.pretrain)))
    if dataset in spec.finetune_systems:
        stages.append(("finetune", lambda: finetune_settings(spec)))
    out = []
    for name, settings in stages:
        try:
            desc = settings()["model"].get("descriptor") or {}
            if name == "finetune" and st.pretrain.enabled and isinstance(desc, dict):
                desc = pretrained_descriptor(spec, desc, type_map) or desc
        except LamflowError:  # a broken pretrained checkpoint or config is reported by stage_config_problems
            continue
        msg = sel_overflow(systems, desc, type_map) if isinstance(desc, dict) else None
        if msg:
            out.append(f"{spec_source(spec)}: {where}: stages.{name} descriptor: {msg}")
    return out


_RESOLVED: dict[str, dict | None] = {}


def pretrained_descriptor(spec: PipelineSpec, desc: dict, type_map: list[str]) -> dict | None:
    """Fine-tuning keeps the pretrained model's sel; with `sel: auto` pretraining computes it from
    its training data. Compute it the same way when those data are small enough to read whole
    (lamflow.model.training.data_warnings.resolved_descriptor), so validate can check the fine-tune data
    against it; None when that is not possible offline."""
    import json

    from lamflow.model.data.systems import load_systems
    from lamflow.model.training.data_warnings import resolved_descriptor

    free = [d for d in spec.stages.pretrain.datasets if spec.datasets[d].label_free]
    paths = [(p, spec.datasets[d].fmt) for d in spec.stages.pretrain.datasets if d not in free
             for p in as_list(spec.datasets[d].train)]
    if any(is_s3(p) for p, _ in paths):
        return None
    cache = json.dumps([desc, type_map, paths, free], sort_keys=True, default=str)
    if cache not in _RESOLVED:
        systems = [s for p, fmt in paths for s in load_systems([p], type_map, fmt)]
        for d in free:  # label-free structures (workflows/spec/label_free.py), for sel only
            from lamflow.model.data.structures import structure_paths

            paths_d, fmt_d = structure_paths(as_list(spec.datasets[d].train), spec.datasets[d].fmt)
            systems += load_systems(paths_d, type_map, fmt_d, labeled=False)
        try:
            _RESOLVED[cache] = resolved_descriptor(desc, type_map, systems)
        except (LamflowError, ValidationError):
            _RESOLVED[cache] = None
    return _RESOLVED[cache]


# the multi-task layout's paths -> the pipeline's (`stages.pretrain.<these>`)
MULTITASK_PATHS = [(re.compile(r"\bmodel\.model_dict\.[^.:]+\."), "model."), (re.compile(r"\bmodel\.shared_dict\."), "model."),
                   (re.compile(r"\bloss_dict\.[^.:]+([.:])"), r"loss\1"),
                   (re.compile(r"\btraining\.data_dict\.[^.:]+\."), "training.")]


def multitask_problems(spec: PipelineSpec, type_map: list[str]) -> list[str]:
    """A multi-task pretraining stage's settings checked by the multi-task trainer's own config
    (lamflow.model.training.multitask_config.parse_multitask_config on what the pretrain OP builds), with the
    errors' paths put back into the pipeline's layout (one line per problem, not per head)."""
    from lamflow.model.training.multitask_config import multitask_layout, parse_multitask_config

    st = spec.stages.pretrain
    heads = {n: {"train": as_list(spec.datasets[n].train), "valid": as_list(spec.datasets[n].valid),
                 "fmt": spec.datasets[n].fmt} for n in st.datasets}  # the pipeline's own data, as the OP stages them
    try:
        parse_multitask_config(multitask_layout(model_settings(st), heads, type_map), "@")
    except LamflowError as e:
        out = []
        for line in str(e).splitlines():
            line = line.replace("@: ", f"{spec_source(spec)}: stages.pretrain.", 1)
            for n in st.denoise:  # a denoise head's settings live under stages.pretrain.denoise.<name>
                line = line.replace(f"pretrain.loss_dict.{n}", f"pretrain.denoise.{n}.loss")
                if len(st.denoise) == 1:  # the multi-task config's own checks name no branch
                    line = line.replace("pretrain.loss_dict: mask_ratio", f"pretrain.denoise.{n}.loss.mask_ratio: mask_ratio")
                line = line.replace(f"pretrain.model.model_dict.{n}.fitting_net", f"pretrain.denoise.{n}.fitting_net")
            for pat, rep in MULTITASK_PATHS:
                line = pat.sub(rep, line)
            if line not in out:
                out.append(line)
        return out
    return []
