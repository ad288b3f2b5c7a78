"""Self-describing checkpoints: {format, version, kind, config, type_map, state_dict[, train_state]}.

Written atomically (io/payload.py, io/files.py: temporary file + `os.replace`, so a killed process
never leaves a half-written checkpoint); read here with `torch.load(weights_only=True)`, which runs
no code from the file, and rebuilt into the model its kind names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lamflow.model.errors import CheckpointError
from lamflow.model.io.deepmd_import import is_deepmd_payload, payload_from_deepmd
from lamflow.model.io.payload import FORMAT, VERSION


def read_checkpoint(path: str | os.PathLike, map_location="cpu", branch: str | None = None) -> dict:
    """A lamflow payload; a deepmd-kit training checkpoint is converted on the fly (`branch` picks
    one of a multi-task one's heads; see deepmd_import.py)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, or one that needs code to load
        raise CheckpointError(f"{path}: {load_failure(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if is_deepmd_payload(payload):
            return payload_from_deepmd(payload, str(path), branch)
        hint = " (a deepmd-kit checkpoint? use `lamflow import-deepmd`)" if isinstance(payload, dict) and "model" in payload else ""
        raise CheckpointError(f"{path}: not a lamflow checkpoint{hint}")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: format version {payload['version']}, this lamflow reads <= {VERSION}")
    return payload


def load_failure(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words. PyTorch's own message for a
    pickle with code in it advises rerunning with weights_only=False; never pass that on: loading
    an untrusted pickle that way runs whatever code it holds."""
    import pickle
    import re

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (f"not a lamflow checkpoint, refused: it holds pickled Python objects{what} that could run code when "
                "loaded (a lamflow checkpoint holds only tensors and plain data)")
    first = text.splitlines()[0] if text.strip() else ""
    return f"not a lamflow checkpoint (not a readable PyTorch file: {type(e).__name__}{': ' + first if first else ''})"


# kind -> "module:Class"; the class has `from_config(dict)` and loads the payload's state_dict.
# A new kind of model (multi-task, compressed, ...) adds one line here.
KINDS = {
    "energy": "lamflow.model.nn.potential:EnergyModel",
    "multitask": "lamflow.model.nn.multitask:MultiTaskModel",
    "compressed": "lamflow.model.nn.compressed:CompressedModel",
}


def build_from_payload(payload: dict, source: str = "checkpoint"):
    """Rebuild the model a payload describes (its kind picks the class) and load its weights."""
    import importlib

    kind = payload.get("kind", "energy")
    if kind not in KINDS:
        raise CheckpointError(f"{source}: unknown model kind {kind!r} (known: {sorted(KINDS)})")
    mod, cls = KINDS[kind].split(":")
    try:
        model_cls = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError):
        raise CheckpointError(f"{source}: model kind {kind!r} is not available in this lamflow") from None
    model = model_cls.from_config(payload["config"])
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    payload = read_checkpoint(path)
    model = build_from_payload(payload, str(path))
    return model.to(resolve_device(device)).eval()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
