"""Atomic file writes: a temporary file in the same folder, then `os.replace`, so a killed
process never leaves a half-written file (temporaries a killed process left are removed)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

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
