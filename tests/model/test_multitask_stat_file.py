"""The stat file (cached data statistics) in multi-task training: the neighbour statistic of all
branches and the shared descriptor's env-matrix statistics are reused by a later run on the
same data (per-branch samples in the key), and recomputed when a branch's data change."""

from __future__ import annotations

import pytest
import torch
from conftest import data_path
from multitask_helpers import write_subset

from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.model.training import multitask, stats
from lamflow.model.training.multitask import train_multitask
from lamflow.model.training.multitask_config import parse_multitask_config


def config(ch4: str, si: str, stat_file: str) -> dict:
    desc = {"type": "se_e2_a", "rcut": 3.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [4, 8], "axis_neuron": 2, "seed": 1}
    return {
        "model": {"shared_dict": {"tm": ["H", "C", "Si"], "d": desc},
                  "model_dict": {"ch4": {"fitting_net": {"neuron": [8], "seed": 2}},
                                 "si": {"fitting_net": {"neuron": [8], "seed": 3}}}},
        "training": {"data_dict": {"ch4": {"training_data": {"systems": ch4, "batch_size": 2}},
                                   "si": {"training_data": {"systems": si, "batch_size": 1}}},
                     "numb_steps": 1, "disp_freq": 1, "save_freq": 1, "seed": 1, "device": "cpu", "stat_file": stat_file},
    }


def test_multitask_statistics_come_from_the_stat_file_on_a_second_run(tmp_path, monkeypatch):
    ch4 = str(write_subset(data_path("ch4_pbe", "train"), tmp_path / "ch4", 20, 3))
    si = str(data_path("si_pbe_mini", "train"))
    sf = tmp_path / "stat_file.pt"
    first: list[str] = []
    res = train_multitask(parse_multitask_config(config(ch4, si, str(sf)), "mt"), tmp_path / "a", log=first.append)
    assert sf.is_file() and not any("statistics from" in ln for ln in first)
    kinds = {k for k in torch.load(sf, weights_only=True)}
    assert len(kinds) >= 2  # the neighbour statistic and the env-matrix statistics

    def never(*a, **k):
        pytest.fail("statistics computed again")

    with monkeypatch.context() as m:  # the second run must not read the data for them
        m.setattr(stats, "neighbor_stat", never)
        m.setattr(multitask, "stat_samples", never)
        again: list[str] = []
        res2 = train_multitask(parse_multitask_config(config(ch4, si, str(sf)), "mt"), tmp_path / "b", log=again.append)
    assert f"env-matrix statistics from {sf}" in again
    a, b = read_checkpoint(res.checkpoint), read_checkpoint(res2.checkpoint)
    assert a["config"]["descriptor"]["sel"] == b["config"]["descriptor"]["sel"]
    for k, v in a["state_dict"].items():
        if k.startswith("descriptor.") and ("mean" in k or "std" in k):
            assert torch.equal(b["state_dict"][k], v), k

    ch4_less = str(write_subset(data_path("ch4_pbe", "train"), tmp_path / "ch4b", 10, 5))  # one branch's data changed
    third: list[str] = []
    train_multitask(parse_multitask_config(config(ch4_less, si, str(sf)), "mt"), tmp_path / "c", log=third.append)
    assert not any("statistics from" in ln for ln in third)
