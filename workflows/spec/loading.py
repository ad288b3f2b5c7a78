"""Reading a pipeline YAML: relative paths resolved (the pipeline's folder first, then the current
directory), `config:` model files merged under inline keys, label-free globs expanded; the
only place that sees raw YAML."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from pydantic import ValidationError

from lamflow.model.errors import LamflowError
from lamflow.model.schema import MODEL_KEYS, deep_merge, strip_comments
from lamflow.model.training.config import read_yaml

from .base import SpecError, format_errors, is_s3, spec_source
from .label_free import expand_globs
from .schema import PipelineSpec


def find_path(p: str, base: Path) -> Path:
    """A relative path: against the pipeline file's folder first, then the current directory."""
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    for root in (base, Path.cwd()):
        if (root / q).exists():
            return (root / q).resolve()
    return (base / q).resolve()


def merge_model_config(stage: dict, base: Path, source: str, path: str, problems: list[str]) -> dict:
    """Inline model settings over the `config:` file's; returns the stage dict with `config` dropped."""
    cfg_file = stage.get("config")
    if not isinstance(cfg_file, str):
        return stage
    f = find_path(cfg_file, base)
    try:
        raw = strip_comments(read_yaml(f))
    except LamflowError as e:
        problems.append(f"{source}: {path}.config: {e}")
        return {k: v for k, v in stage.items() if k != "config"}
    if not isinstance(raw, dict):
        problems.append(f"{source}: {path}.config: {f}: expected a mapping")
        return {k: v for k, v in stage.items() if k != "config"}
    unknown = [k for k in raw if k not in MODEL_KEYS]
    for k in unknown:
        problems.append(f"{source}: {path}.config: {f}: unknown key {k!r} (a model config holds {', '.join(MODEL_KEYS)})")
    merged = {k: v for k, v in stage.items() if k != "config"}
    for k in MODEL_KEYS:
        if isinstance(raw.get(k), dict):
            inline = stage.get(k, {})
            merged[k] = deep_merge(raw[k], inline if isinstance(inline, dict) else {})
    # data paths of a standalone training config are not the pipeline's
    tr = merged.get("training")
    if isinstance(tr, dict):
        for dk in ("training_data", "validation_data"):
            if isinstance(tr.get(dk), dict):
                tr[dk] = {k: v for k, v in tr[dk].items() if k != "systems"}
    merged["config_file"] = str(f)
    return merged


def read_stage_config(path: str, base: Path, source: str, where: str, problems: list[str]) -> dict:
    """`config: file.yaml` of clean/distill/compress: the file's mapping."""
    f = find_path(path, base)
    try:
        raw = strip_comments(read_yaml(f))
    except LamflowError as e:
        problems.append(f"{source}: {where}.config: {e}")
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{source}: {where}.config: {f}: expected a mapping")
        return {}
    return raw


def resolve_paths(raw: dict, base: Path) -> None:
    """Dataset paths and checkpoint paths become absolute (s3:// URIs stay)."""
    ds = raw.get("datasets")
    if isinstance(ds, dict):
        for d in ds.values():
            if not isinstance(d, dict):
                continue
            for split in ("train", "valid", "test"):
                v = d.get(split)
                if isinstance(v, str):
                    d[split] = v if is_s3(v) else str(find_path(v, base))
                elif isinstance(v, list):
                    d[split] = [x if not isinstance(x, str) or is_s3(x) else str(find_path(x, base)) for x in v]
    ft = (raw.get("stages") or {}).get("finetune") if isinstance(raw.get("stages"), dict) else None
    if isinstance(ft, dict) and isinstance(ft.get("pretrained"), str) and not is_s3(ft["pretrained"]):
        ft["pretrained"] = str(find_path(ft["pretrained"], base))


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """Read, merge and validate a pipeline YAML; raise SpecError listing every problem."""
    path = Path(path)
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    return spec_from_dict(raw, path.resolve().parent, source)


def spec_from_dict(raw: dict, base: Path, source: str = "pipeline") -> PipelineSpec:
    raw = strip_comments(copy.deepcopy(raw))
    problems: list[str] = []
    stages = raw.get("stages")
    if isinstance(stages, dict):
        for name in ("pretrain", "finetune"):
            if isinstance(stages.get(name), dict):
                stages[name] = merge_model_config(stages[name], base, source, f"stages.{name}", problems)
        for name in ("clean", "distill", "compress"):
            if isinstance(stages.get(name), dict) and isinstance(stages[name].get("config"), str):
                stages[name]["config"] = read_stage_config(stages[name]["config"], base, source, f"stages.{name}", problems)
    resolve_paths(raw, base)

    expand_globs(raw, source, problems)  # label-free datasets may name files by pattern ("structures/*.cif")
    config_files = {}
    if isinstance(stages, dict):
        for name in ("pretrain", "finetune"):
            if isinstance(stages.get(name), dict) and "config_file" in stages[name]:
                config_files[name] = stages[name].pop("config_file")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        problems += format_errors(source, e)
    if problems:
        raise SpecError(problems)
    object.__setattr__(spec, "_source", source)
    object.__setattr__(spec, "_config_files", config_files)
    return spec


def spec_summary(spec: PipelineSpec) -> dict:
    """A JSON-able description of the resolved spec (stored with each run, for retry)."""
    return {"spec": spec.model_dump(mode="json", exclude_unset=True), "source": spec_source(spec)}


def spec_from_summary(d: dict) -> PipelineSpec:
    spec = PipelineSpec.model_validate(d["spec"])
    object.__setattr__(spec, "_source", d.get("source", "pipeline"))
    return spec
