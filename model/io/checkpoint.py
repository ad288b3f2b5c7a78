"""Self-describing checkpoints: {format, version, kind, config, type_map, state_dict[, train_state]}.

Written to a temporary file in the same folder and renamed (`os.replace`), so a killed process
never leaves a half-written checkpoint; read with `torch.load(weights_only=True)`, which runs
no code from the file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from lamflow.model.errors import CheckpointError

FORMAT = "lamflow-model"
VERSION = 1


_STARTED = time.time()  # temporaries older than this process were left by a killed one


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.*.tmp` files next to `path` that an earlier, killed writer left behind (SIGKILL
    between the temp write and os.replace). Only files older than this process are touched, so a
    temporary another live process is writing right now is left alone."""
    path = Path(path)
    gone = []
    if path.parent.is_dir():
        for f in path.parent.glob(f".{path.name}.*.tmp"):
            try:
                if f.stat().st_mtime < _STARTED:
                    f.unlink()
                    gone.append(f)
            except FileNotFoundError:
                pass
    return gone


def atomic_save(obj, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def model_payload(model, kind: str | None = None, extra: dict | None = None) -> dict:
    kind = kind or getattr(model, "kind", "energy")
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
        from lamflow.model.io.deepmd_import import is_deepmd_payload, payload_from_deepmd

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
    "multitask": "lamflow.model.training.multitask:MultiTaskModel",
    "compressed": "lamflow.model.tasks.compress:CompressedModel",
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
