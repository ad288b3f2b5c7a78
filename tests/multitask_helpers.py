"""Small data subsets and a multi-task pretraining shared by the multi-task, fine-tune, inspect
and DDP tests. The pretraining runs once per pytest process (cached here) however many test files
ask for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from conftest import data_path

from lamflow.model.data.systems import find_systems, load_systems

PRETRAIN_SETS = {"water": "water_h2o", "mapbi3": "mapbi3_scan", "si": "si_pbe"}
TYPE_MAP_ALL = ["O", "H", "I", "Pb", "C", "N", "Si"]


def write_subset(src: Path, dst: Path, nframes: int, stride: int = 1, labels: bool = True,
                 rename: dict | None = None) -> Path:
    """The first system under `src`, frames 0, stride, 2 stride, ... (at most nframes), as deepmd/npy
    in `dst`; `labels=False` writes coordinates and cell only; `rename` changes element names."""
    sp = find_systems(src)[0]
    names = (sp / "type_map.raw").read_text().split()
    s = load_systems(str(sp), names)[0]
    s = s.subset(np.arange(0, s.nframes, stride)[:nframes])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "set.000").mkdir(exist_ok=True)
    (dst / "type.raw").write_text("\n".join(map(str, s.atype)) + "\n")
    (dst / "type_map.raw").write_text("\n".join((rename or {}).get(n, n) for n in names) + "\n")
    np.save(dst / "set.000" / "coord.npy", s.coord.reshape(s.nframes, -1))
    if s.box is not None:
        np.save(dst / "set.000" / "box.npy", s.box.reshape(s.nframes, -1))
    else:
        (dst / "nopbc").write_text("")
    for key in ("energy", "force", "virial") if labels else ():
        a = getattr(s, key)
        if a is not None:
            np.save(dst / "set.000" / f"{key}.npy", a.reshape(s.nframes, -1))
    return dst


def pretrain_data(root: Path, ntrain: int = 40, nvalid: int = 6) -> dict[str, dict[str, str]]:
    """Train/valid subsets of the three pretraining sets (every 3rd frame of train, every 5th of valid)."""
    out = {}
    for branch, name in PRETRAIN_SETS.items():
        tr = write_subset(data_path(name, "train"), root / name / "train", ntrain, 3)
        va = write_subset(data_path(name, "valid"), root / name / "valid", nvalid, 5)
        out[branch] = {"train": str(tr), "valid": str(va)}
    return out


# A small se_e2_a (one embedding net per neighbour type) at rcut 3 A: it learns forces of all three
# sets within a few hundred steps on CPU, and CH4's C-H and H-H geometry lies inside its cutoff.
PRETRAIN_DESCRIPTOR = {"type": "se_e2_a", "rcut": 3.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [8, 16],
                       "axis_neuron": 4, "type_one_side": True, "seed": 1}
PRETRAIN_FITTING = {"neuron": [32, 32]}


def multitask_config(data: dict[str, dict[str, str]], descriptor: dict | None = None, steps: int = 400,
                     lr: float = 0.01, model_prob: dict | None = None, extra_branches: dict | None = None,
                     **training) -> dict:
    """A deepmd-kit style multi-task config over `data` (branch -> {"train", "valid"})."""
    branches = {b: {"type_map": "type_map_all", "descriptor": "shared", "fitting_net": {**PRETRAIN_FITTING, "seed": 2 + k}}
                for k, b in enumerate(data)}
    data_dict = {b: {"training_data": {"systems": d["train"], "batch_size": 1},
                     "validation_data": {"systems": d["valid"], "batch_size": 3}} for b, d in data.items()}
    loss_dict = {}
    for b, spec in (extra_branches or {}).items():
        branches[b] = spec["model"]
        data_dict[b] = spec["data"]
        if "loss" in spec:
            loss_dict[b] = spec["loss"]
    cfg = {
        "model": {"shared_dict": {"type_map_all": TYPE_MAP_ALL, "shared": descriptor or PRETRAIN_DESCRIPTOR},
                  "model_dict": branches},
        "learning_rate": {"start_lr": lr, "stop_lr": lr / 50, "decay_steps": max(1, steps // 15)},
        "training": {"data_dict": data_dict, "numb_steps": steps, "seed": 1, "disp_freq": max(1, steps // 6),
                     "save_freq": steps, "device": "cpu", **training},
    }
    if loss_dict:
        cfg["loss_dict"] = loss_dict
    if model_prob:
        cfg["training"]["model_prob"] = model_prob
    return cfg


def write_yaml(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_PRETRAINED: dict = {}


def pretrained(tmp_path_factory):
    """(TrainResult, data) of the shared multi-task pretraining on water / MAPbI3 / Si, run once."""
    if "result" not in _PRETRAINED:
        from lamflow.model.training.multitask import train_multitask
        from lamflow.model.training.multitask_config import load_multitask_config

        root = tmp_path_factory.mktemp("pretrain")
        data = pretrain_data(root / "data")
        cfg = multitask_config(data, model_prob={"water": 1.0, "mapbi3": 3.0, "si": 0.5})
        path = write_yaml(cfg, root / "pretrain.yaml")
        _PRETRAINED["result"] = (train_multitask(load_multitask_config(path), root / "out", log=lambda *a: None), data)
    return _PRETRAINED["result"]

