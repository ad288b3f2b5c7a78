"""Stage settings owned by lamflow.model modules: which stages this build can run, and their
configs validated with the model's own pydantic classes (errors carry the pipeline's YAML path)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from .spec import PipelineSpec

# stage -> (module, what it must provide)
MODULES = {
    "clean": ("lamflow.model.clean", ("clean", "CleanConfig")),
    "finetune": ("lamflow.model.finetune", ("finetune", "zero_shot")),
    "distill": ("lamflow.model.distill", ("distill", "DistillConfig")),
    "compress": ("lamflow.model.compress", ("compress",)),
}


def module(stage: str):
    """The model module a stage needs, or None when this build does not have it."""
    name, attrs = MODULES[stage]
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    return mod if all(hasattr(mod, a) for a in attrs) else None


def available(stage: str) -> bool:
    return stage not in MODULES or module(stage) is not None


def multitask_available() -> bool:
    try:
        importlib.import_module("lamflow.model.multitask")
    except ImportError:
        return False
    return True


def validate_config(cls: type[BaseModel], raw: dict, source: str, path: str) -> tuple[BaseModel | None, list[str]]:
    from .spec import format_errors

    try:
        return cls.model_validate(raw), []
    except ValidationError as e:
        return None, format_errors(source, e, path)


def problems(spec: "PipelineSpec") -> list[str]:
    from .spec import spec_source

    source = spec_source(spec)
    out: list[str] = []
    for stage in spec.stages.enabled():
        if not available(stage):
            out.append(f"{source}: stages.{stage}: this build of lamflow has no {MODULES[stage][0]}; "
                       f"disable the stage (enabled: false)")
    st = spec.stages
    if st.pretrain.enabled and len(st.pretrain.datasets) > 1 and not multitask_available():
        out.append(f"{source}: stages.pretrain.datasets: multi-task pretraining (lamflow.model.multitask) is not in "
                   "this build; name one dataset")
    if st.clean.enabled and available("clean"):
        out += validate_config(module("clean").CleanConfig, dict(st.clean.config), source, "stages.clean.config")[1]
    if st.distill.enabled and available("distill"):
        out += validate_config(module("distill").DistillConfig, dict(st.distill.config), source, "stages.distill.config")[1]
    if st.compress.enabled:
        unknown = sorted(set(st.compress.config) - COMPRESS_KEYS)
        if unknown:
            out.append(f"{source}: stages.compress.config: unknown key(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(COMPRESS_KEYS))})")
    return out


COMPRESS_KEYS = {"stride", "extrapolate", "check_frequency", "min_nbor_dist"}
