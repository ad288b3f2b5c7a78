"""What every stage OP shares: the staged data layout, model-config assembly, outputs, error
mapping. (Running a training, here or under torchrun: ops/training.py.)

Data reach an OP as one artifact folder, staged by the workflow builder (or written by the clean
stage) in this layout:

    <root>/<dataset>/dataset.json          {"fmt": "auto", "splits": {"train": 2, "valid": 1}}
    <root>/<dataset>/<split>/<i>           the i-th path of that split (a folder or a file)

`split_paths(root, name, split)` turns it back into the list of paths `load_systems` takes. This
module imports neither dflow nor torch, so the pipeline spec can use it cheaply.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MODEL_KEYS = ("model", "learning_rate", "loss", "training")
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- staged data


def stage_dataset(root: Path, name: str, splits: dict[str, list[str]], fmt: str = "auto", link: bool = True) -> Path:
    """Write `root/name/` in the staged layout: symlinks (or copies) to the given paths."""
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, paths in splits.items():
        if not paths:
            continue
        sd = d / split
        if sd.exists():
            shutil.rmtree(sd)
        sd.mkdir()
        for i, p in enumerate(paths):
            src = Path(p).resolve()
            if link:
                (sd / str(i)).symlink_to(src, target_is_directory=src.is_dir())
            elif src.is_dir():
                shutil.copytree(src, sd / str(i))
            else:
                shutil.copy2(src, sd / str(i))
        counts[split] = len(paths)
    (d / "dataset.json").write_text(json.dumps({"fmt": fmt, "splits": counts}))
    return d


def dataset_info(root: Path, name: str) -> dict:
    f = Path(root) / name / "dataset.json"
    if not f.is_file():
        from lamflow.model.errors import DataError

        raise DataError(f"{root}: dataset {name!r} is not in this data artifact")
    return json.loads(f.read_text())


def split_paths(root: Path, name: str, split: str) -> list[str]:
    """The paths of one split of a staged dataset ([] when the split is absent)."""
    info = dataset_info(root, name)
    n = info["splits"].get(split, 0)
    return [str(Path(root) / name / split / str(i)) for i in range(n)]


def pick_root(name: str, data: Path, cleaned: Path | None) -> Path:
    """The cleaned copy of a dataset when the clean stage produced one, else the raw data."""
    if cleaned is not None and (Path(cleaned) / name / "dataset.json").is_file():
        return Path(cleaned)
    return Path(data)


def dataset_fmt(root: Path, name: str) -> str:
    return dataset_info(root, name).get("fmt", "auto")


# ----------------------------------------------------------------------------- model configs


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def train_config_dict(settings: dict, type_map: list[str], train: list[str], valid: list[str] | None,
                      fmt: str = "auto", threads: int = 0) -> dict:
    """deepmd-kit-style `model/learning_rate/loss/training` settings + data paths -> TrainConfig dict.
    `model.type_map` defaults to the pipeline's type map; `threads` (> 0) sets training.num_threads
    unless the settings give it."""
    d = {k: copy.deepcopy(settings.get(k) or {}) for k in MODEL_KEYS}
    d["model"].setdefault("type_map", list(type_map))
    tr = d["training"]
    tr["training_data"] = {**(tr.get("training_data") or {}), "systems": list(train), "fmt": fmt}
    if valid:
        tr["validation_data"] = {**(tr.get("validation_data") or {}), "systems": list(valid), "fmt": fmt}
    else:
        tr.pop("validation_data", None)
    if threads and "num_threads" not in tr:
        tr["num_threads"] = int(threads)
    return d


def train_config(settings: dict, type_map: list[str], train: list[str], valid: list[str] | None, fmt: str = "auto",
                 source: str = "stage config", threads: int = 0):
    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig

    return parse_config(TrainConfig, train_config_dict(settings, type_map, train, valid, fmt, threads), source)


# ----------------------------------------------------------------------------- outputs


def write_json(path: Path, obj) -> Path:
    from lamflow.model.io.files import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def copy_outputs(src: Path, dst: Path, names: list[str]) -> None:
    """Copy the named files (those that exist) from a training folder into the step's output."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        f = src / n
        if f.is_file() and f.resolve() != (dst / n).resolve():
            shutil.copy2(f, dst / n)


def training_dir(out: Path, resume_dir: str | None) -> Path:
    """Where a training stage writes its checkpoints: `resume_dir` when the pipeline gives one (it
    survives a failed step, so a rerun continues from the last checkpoint), else the output."""
    d = Path(resume_dir) if resume_dir else out
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- errors and tracing


@contextmanager
def user_errors_are_fatal():
    """A LamflowError (bad data, bad config) will not go away on a retry: dflow's FatalError
    (exit code 2) tells Argo not to retry it. Anything else stays a transient failure."""
    from dflow.python import FatalError

    from lamflow.model.errors import LamflowError

    try:
        yield
    except LamflowError as e:
        raise FatalError(str(e)) from e


def trace(stage: str, detail: str = "") -> None:
    """Record that a stage really ran, and fail on purpose when asked to.

    LAMFLOW_STEP_LOG=FILE appends "stage detail" to FILE for each run (tests count reruns with it);
    LAMFLOW_FAIL_STAGE=stage[,stage] makes those stages raise (tests of `lamflow retry`)."""
    log = os.environ.get("LAMFLOW_STEP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{stage} {detail}".rstrip() + "\n")
    fail = {s.strip() for s in os.environ.get("LAMFLOW_FAIL_STAGE", "").split(",") if s.strip()}
    if stage in fail or f"{stage}:{detail}" in fail:
        raise RuntimeError(f"{stage}: failing on purpose (LAMFLOW_FAIL_STAGE={os.environ['LAMFLOW_FAIL_STAGE']})")


def set_threads(n: int = 0) -> None:
    """torch's intra-op threads for this step (0: torch's default)."""
    if n and n > 0:
        import torch

        torch.set_num_threads(int(n))
