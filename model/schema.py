"""Config plumbing every layer shares: the strict pydantic base, comment stripping, one
formatter of validation errors (one line per problem, naming the file and key), parsing a raw
mapping into a config class, and the merge of deepmd-kit-style settings."""

from __future__ import annotations

import copy
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

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


def union_tags(cls: type[BaseModel]) -> frozenset[str]:
    """The tags of every discriminated union inside config class `cls` (e.g. the descriptor `type`s
    of nn/config.py): pydantic puts the tag into an error's location, where a reader wants keys."""
    tags: set[str] = set()
    seen: set[type] = set()

    def members(tp) -> list:
        return [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]

    def walk(tp) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            for f in tp.model_fields.values():
                if isinstance(f.discriminator, str):
                    for m in members(f.annotation):
                        tags.update(str(t) for t in get_args(m.model_fields[f.discriminator].annotation))
                walk(f.annotation)
            return
        for a in get_args(tp):
            if isinstance(a, FieldInfo) and isinstance(a.discriminator, str):
                for m in members(get_args(tp)[0]):
                    tags.update(str(t) for t in get_args(m.model_fields[a.discriminator].annotation))
            elif not isinstance(a, (str, int, float, bool, FieldInfo)) and a is not None:
                walk(a)

    walk(cls)
    return frozenset(tags)


# members of plain (not discriminated) unions, which pydantic also names in an error's location
UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list[str]", "list[int]", "list[float]"})


def error_lines(source: str, err: ValidationError, prefix: str = "", *, tags: frozenset[str] | set[str] = frozenset(),
                pipeline: bool = False) -> list[str]:
    """pydantic errors -> one line each, `source: key.path[i]: message`: the one formatter of
    lamflow's config errors (training and multi-task configs, checkpoints' configs, pipeline specs).
    `tags` (union_tags of the config class, DESCRIPTOR_TAGS) and union members are left out of the
    key path; `prefix` goes in front of it. `pipeline`: a pipeline spec, whose validators' messages
    are lines of their own ("stages.x: ...", several per error), without pydantic's "Value error, "."""
    skip = UNION_MEMBERS | set(tags)
    lines = []
    for e in err.errors():
        path = prefix
        for p in e["loc"]:
            if isinstance(p, int):
                path += f"[{p}]"
            elif p in skip or str(p).startswith(("function-", "tagged-union")):
                continue
            else:
                path += ("." if path else "") + str(p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown type {e['ctx']['tag']!r} (expected {e['ctx']['expected_tags']})"
        elif pipeline and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        for part in msg.split("\n") if pipeline else [msg]:
            own_path = pipeline and path == prefix and ":" in part and e["type"] == "value_error"
            lines.append(f"{source}: {part}" if own_path else f"{source}: {path or '(top level)'}: {part}")
    return list(dict.fromkeys(lines))


def format_validation_error(source: str, err: ValidationError, tags: frozenset[str] | set[str] = frozenset(),
                            prefix: str = "") -> str:
    """One line per problem: `train.yaml: model.descriptor.rcut: Input should be greater than 0`
    (error_lines joined; the key path starts with `prefix`)."""
    return "\n".join(error_lines(source, err, prefix, tags=tags))


def parse_config(cls: type[BaseModel], raw: Any, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return cls.model_validate(strip_comments(raw))
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e, union_tags(cls))) from None


# the sections of a deepmd-kit-style training input (input.json), in its order
MODEL_KEYS = ("model", "learning_rate", "loss", "training")


def deep_merge(a: dict, b: dict) -> dict:
    """`b` over `a`, nested mappings merged key by key (copies; neither input changes)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
