"""The one YAML (and JSON) reader of lamflow: `yaml.safe_load` semantics (no tags that build Python
objects), and a key given twice in one mapping is an error naming the key and both lines, instead
of the last value silently winning:

    pipe.yaml: duplicate key 'numb_steps' at lines 12 and 15

JSON (a deepmd-kit input.json) goes through `json` with the same duplicate-key rule.
Every reader of YAML in model/, ops/ and workflows/ calls `read_yaml` or `load_yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lamflow.model.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice. Keys brought in by a `<<: *anchor` merge
    may be overridden (that is what the merge is for); only keys written twice are refused."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeConstructor reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML text (safe subset, unique keys); errors are ConfigErrors naming `source`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 -- UniqueKeyLoader is a SafeLoader
    except _DuplicateKey as d:
        raise ConfigError(f"{source}: duplicate key {d.key!r} at lines {d.first} and {d.second}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{source}: malformed YAML{line}: {getattr(e, 'problem', None) or e}") from None


def load_json(text: str, source: str = "JSON") -> Any:
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise ConfigError(f"{source}: duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: malformed JSON (line {e.lineno}): {e.msg}") from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file (or JSON, by its .json suffix); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return load_json(text, str(path)) if path.suffix == ".json" else load_yaml(text, str(path))
