"""Every problem that can be found before a step is submitted (`check_spec`): paths, data (elements,
NaN labels, sel overflow), each stage's settings validated by the model layer's own config
classes, fine-tuning onto new elements, and (for Argo) pinned images."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from lamflow.model.errors import LamflowError
from lamflow.model.schema import MODEL_KEYS
from lamflow.model.training.config import TrainSettings
from lamflow.ops.artifacts import model_file

from . import stage_configs
from .base import as_list, format_errors, is_s3, spec_source
from .elements import resolved_type_map
from .label_free import label_free_elements, label_free_systems
from .schema import PipelineSpec
from .settings import finetune_settings, model_settings


def settings_problems(source: str, path: str, settings: dict, type_map: list[str]) -> list[str]:
    """A training stage's settings checked by the model layer's TrainSettings (TrainConfig before
    the pipeline attaches the data); `model.type_map` defaults to the pipeline's, as in the OP."""
    d = {k: settings.get(k) or {} for k in MODEL_KEYS}
    d["model"] = {"type_map": list(type_map), **d["model"]}
    try:
        TrainSettings.model_validate(d)
    except ValidationError as e:
        return format_errors(source, e, path)
    return []


def check_spec(spec: PipelineSpec, *, data: bool = True, models: bool = True) -> list[str]:
    """Every problem that can be found before submitting, one line each (empty: all good).
    data=True also reads every local dataset: paths exist, elements are in the type map, no
    NaN/inf labels, at least one frame. models=True also validates the clean/distill settings with
    the model modules' own classes (which import torch; `lamflow render` skips them)."""
    if data:
        from lamflow.model.data.systems import elements_in, load_systems

    source = spec_source(spec)
    problems: list[str] = []
    elements: dict[str, list[str]] = {}
    used = spec.used_datasets()
    for name in used:
        ds = spec.datasets[name]
        if ds.label_free and data:  # structures only (workflows/spec/label_free.py reads them)
            problems += label_free_elements(spec, name, elements)
            continue
        for split in ("train", "valid", "test"):
            for i, p in enumerate(as_list(getattr(ds, split))):
                where = f"datasets.{name}.{split}" + (f"[{i}]" if isinstance(getattr(ds, split), list) else "")
                if is_s3(p):
                    continue
                if not Path(p).exists():
                    problems.append(f"{source}: {where}: no such file or directory: {p}")
                    continue
                if data:
                    try:
                        elements.setdefault(f"{name}.{split}", [])
                        elements[f"{name}.{split}"] += [e for e in elements_in(p, ds.fmt) if e not in elements[f"{name}.{split}"]]
                    except LamflowError as e:
                        problems.append(f"{source}: {where}: {e}")
    if problems:
        return problems
    try:
        type_map = resolved_type_map(spec, elements if data else None) if data or spec.type_map else []
    except LamflowError as e:
        return [f"{source}: datasets: {e}"]
    if data:
        for name in used:
            ds = spec.datasets[name]
            if ds.label_free:
                problems += label_free_systems(spec, name, type_map)
                continue
            for split in ("train", "valid", "test"):
                for i, p in enumerate(as_list(getattr(ds, split))):
                    if is_s3(p):
                        continue
                    where = f"datasets.{name}.{split}" + (f"[{i}]" if isinstance(getattr(ds, split), list) else "")
                    try:
                        loaded = load_systems([p], type_map, ds.fmt, lazy=True)
                    except LamflowError as e:
                        problems.append(f"{source}: {where}: {e}")
                        continue
                    problems += stage_configs.sel_problems(spec, name, where, loaded, type_map)
    problems += stage_config_problems(spec, type_map or placeholder_type_map(spec), models=models)
    if data:  # every problem is reported, coverage too
        problems += [line for line in finetune_coverage(spec, elements) if not line.endswith("new, will be added")]
    return problems


def placeholder_type_map(spec: PipelineSpec) -> list[str]:
    """When the data are not read, a stand-in type map: as many elements as a per-element `sel`
    list names (so only the data check, not this stand-in, judges its length)."""
    n = 1
    for st in (spec.stages.pretrain, spec.stages.finetune):
        sel = (st.model.get("descriptor") or {}).get("sel") if isinstance(st.model, dict) else None
        if isinstance(sel, list) and sel:
            n = len(sel)
    return [f"X{i}" for i in range(n)]


def finetune_coverage(spec: PipelineSpec, elements: dict[str, list[str]]) -> list[str]:
    """Elements of each fine-tuning system that a local `stages.finetune.pretrained` checkpoint lacks:
    "new, will be added" where its descriptor has a type embedding, else a problem naming them.
    `elements`: "dataset.split" -> elements, as check_spec collects them."""
    ft = spec.stages.finetune
    if not ft.enabled or spec.stages.pretrain.enabled or not ft.pretrained or is_s3(ft.pretrained):
        return []
    from lamflow.model.io.checkpoint import read_checkpoint
    from lamflow.model.training.finetune import can_add_elements

    p = Path(ft.pretrained)
    try:
        payload = read_checkpoint(model_file(p))
    except LamflowError as e:
        return [f"{spec_source(spec)}: stages.finetune.pretrained: {e}"]
    tm, dtype = list(payload["config"]["type_map"]), payload["config"]["descriptor"]["type"]
    out = []
    for name in spec.finetune_systems:
        new = [e for split in ("train", "valid") for e in elements.get(f"{name}.{split}", []) if e not in tm]
        new = list(dict.fromkeys(new))
        if not new:
            continue
        where = (f"{spec_source(spec)}: stages.finetune.systems: {name}: element(s) {', '.join(new)} "
                 f"not in the type map {tm} of {p}")
        out.append(f"{where}: new, will be added" if can_add_elements(dtype) else
                   f"{where}; its {dtype} descriptor (one net per type pair) cannot add elements")
    return out


def stage_config_problems(spec: PipelineSpec, type_map: list[str], models: bool = True) -> list[str]:
    """Each training stage's settings and each stage config, checked by the model layer's classes."""
    source = spec_source(spec)
    out: list[str] = []
    st = spec.stages
    if (st.pretrain.enabled and models and (len(st.pretrain.datasets) > 1 or st.pretrain.denoise)
            and stage_configs.multitask_available()):
        out += stage_configs.multitask_problems(spec, type_map)  # the multi-task trainer's own config model
    elif st.pretrain.enabled:
        out += settings_problems(source, "stages.pretrain", model_settings(st.pretrain), type_map)
    if st.finetune.enabled:
        try:
            ft = finetune_settings(spec)
        except LamflowError as e:
            return out + [f"{source}: stages.finetune.pretrained: {e}"]
        out += settings_problems(source, "stages.finetune", ft, type_map)
    out += _stage_extra_problems(spec, models)
    for name in st.enabled():
        r = spec.resources_of(name)
        if r.timeout is not None and r.timeout > 30 * 86400:
            out.append(f"{source}: stages.{name}.resources.timeout: {r.timeout} s is more than 30 days")
    return out


def _stage_extra_problems(spec: PipelineSpec, models: bool = True) -> list[str]:
    """Stage configs owned by lamflow.model modules (clean, distill, compress), when present."""
    return stage_configs.problems(spec, models)


def image_problems(spec: PipelineSpec) -> list[str]:
    """For Argo: every enabled stage has an image, pinned by a tag other than `latest` or a digest."""
    source = spec_source(spec)
    out = []
    for name in spec.stages.enabled():
        img = spec.resources_of(name).image
        if not img:
            out.append(f"{source}: stages.{name}.resources.image: no image (set it here or in the top-level resources)")
        elif not pinned(img):
            out.append(f"{source}: stages.{name}.resources.image: {img!r} is not pinned (use a version tag or @sha256:...)")
    if spec.engine.util_image and not pinned(spec.engine.util_image):
        out.append(f"{source}: engine.util_image: {spec.engine.util_image!r} is not pinned")
    return out


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return bool(re.search(r"@sha256:[0-9a-f]{64}$", image))
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")
