"""What a lamflow checkpoint holds: {format, version, kind, config, type_map, state_dict[, ...]},
and writing one (atomically, io/files.py). Reading and rebuilding: io/checkpoint.py."""

from __future__ import annotations

from pathlib import Path

from lamflow.model.io.files import atomic_save

FORMAT = "lamflow-model"


VERSION = 1


def model_payload(model, kind: str | None = None, extra: dict | None = None) -> dict:
    kind = kind or model.kind
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": model.cfg.model_dump(mode="json"),
        "type_map": list(model.type_map),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }


def save_model(model, path, kind: str | None = None, extra: dict | None = None) -> Path:
    return atomic_save(model_payload(model, kind, extra), path)
