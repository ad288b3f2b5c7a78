"""Config plumbing every layer shares: the strict pydantic base, comment stripping, one
formatter of validation errors (one line per problem, naming the file and key), parsing a raw
mapping into a config class, and the merge of deepmd-kit-style settings."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lamflow.model.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def strip_comments(obj: Any) -> Any:
    """Drop keys starting with '_' (deepmd-kit inputs use "_comment")."""
    if isinstance(obj, dict):
        return {k: strip_comments(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(obj, list):
        return [strip_comments(v) for v in obj]
    return obj


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: `train.yaml: model.descriptor.rcut: Input should be greater than 0`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("se_e2_a", "se_atten", "dpa1", "se_a", "se_atten_v2", "dpa2", "dpa3")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown type {e.get('input', {}).get('type') if isinstance(e.get('input'), dict) else e.get('input')!r}"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(cls: type[BaseModel], raw: Any, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return cls.model_validate(strip_comments(raw))
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


# the sections of a deepmd-kit-style training input (input.json), in its order
MODEL_KEYS = ("model", "learning_rate", "loss", "training")


def deep_merge(a: dict, b: dict) -> dict:
    """`b` over `a`, nested mappings merged key by key (copies; neither input changes)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
