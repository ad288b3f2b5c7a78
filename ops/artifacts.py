"""Model artifacts: what a stage hands on as "a model".

A model artifact is a folder holding the checkpoint `model.ckpt` (next to the training's other
outputs: lcurve.csv/png, train.json, summary.json). Everything that reads a model also takes the
checkpoint file itself, so a user can point a command or a pipeline at either:

    model_file(out/)            -> out/model.ckpt
    model_file(x.ckpt)          -> x.ckpt
    has_model(out/)             -> whether out/model.ckpt exists

This module imports neither dflow nor torch (the spec checks and the CLI use it).
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_FILE = "model.ckpt"
TRAINING_FILES = (MODEL_FILE, "lcurve.csv", "lcurve.png", "train.json")  # what a training stage hands on


def model_file(path: str | os.PathLike) -> Path:
    """The checkpoint of a model artifact: `path/model.ckpt` for a folder, else `path` itself."""
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def has_model(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a checkpoint (a stage that produced a model)."""
    return (Path(folder) / MODEL_FILE).is_file()
