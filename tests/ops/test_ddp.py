"""Data-parallel training: `torchrun --nproc_per_node 2` with gloo on CPU gives the same model as
one process with the same global batch (2 ranks x batch 2 == 1 rank x batch 4, the same frames),
for a single-task and a multi-task config (all ranks draw the same branch each step)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import data_path
from multitask_helpers import write_subset, write_yaml  # noqa: F401

from lamflow.model.data.batch import DataSet
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.data.systems import load_systems
from lamflow.model.io.checkpoint import load_model
from lamflow.model.training.config import load_train_config
from lamflow.model.training.distributed import ShardedDataSet
from lamflow.model.training.multitask import train_multitask
from lamflow.model.training.multitask_config import load_multitask_config
from lamflow.model.training.trainer import train

DESCRIPTOR = {"type": "se_atten", "rcut": 3.0, "rcut_smth": 0.5, "sel": 8, "neuron": [4, 8], "axis_neuron": 2,
              "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 1}


@pytest.fixture(scope="module")
def ch4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ch4")
    return (write_subset(data_path("ch4_pbe", "train"), tmp / "train", 24, 5),
            write_subset(data_path("ch4_pbe", "valid"), tmp / "valid", 6, 9))


def single_task(ch4, batch):
    return {"model": {"type_map": ["H", "C"], "descriptor": DESCRIPTOR, "fitting_net": {"neuron": [8], "seed": 2}},
            "learning_rate": {"start_lr": 0.005, "stop_lr": 0.0005, "decay_steps": 2, "scale_by_worker": "none"},
            "training": {"training_data": {"systems": str(ch4[0]), "batch_size": batch},
                         "validation_data": {"systems": str(ch4[1]), "batch_size": 6},
                         "numb_steps": 10, "seed": 3, "disp_freq": 3, "save_freq": 5, "device": "cpu"}}


def multi_task(ch4, batch):
    data = {"training_data": {"systems": str(ch4[0]), "batch_size": batch},
            "validation_data": {"systems": str(ch4[1]), "batch_size": 6}}
    return {"model": {"shared_dict": {"tm": ["H", "C"], "d": DESCRIPTOR},
                      "model_dict": {"a": {"fitting_net": {"neuron": [8], "seed": 2}},
                                     "b": {"fitting_net": {"neuron": [8], "seed": 4}}}},
            "learning_rate": {"start_lr": 0.005, "stop_lr": 0.0005, "decay_steps": 2, "scale_by_worker": "none"},
            "loss_dict": {"b": {"start_pref_e": 1.0, "start_pref_f": 10.0}},
            "training": {"data_dict": {"a": data, "b": data}, "numb_steps": 10, "seed": 3, "disp_freq": 3,
                         "save_freq": 5, "device": "cpu"}}


def run_one_process(kind, path, out):
    if kind == "single":
        return train(load_train_config(path), out, log=lambda *a: None)
    return train_multitask(load_multitask_config(path), out, log=lambda *a: None)


def torchrun(config, out, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lamflow.workflows.cli", "train", str(config), "-o", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def curve(path):
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [{k: v for k, v in r.items() if k.endswith("_val") or k in ("step", "task", "lr")} for r in rows]


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(ch4, tmp_path, kind):
    make = single_task if kind == "single" else multi_task
    one = run_one_process(kind, write_yaml(make(ch4, 4), tmp_path / "one.yaml"), tmp_path / "one")
    proc = torchrun(write_yaml(make(ch4, 2), tmp_path / "two.yaml"), tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 2  # only rank 0 logs: the setup line and the summary
    a, b = curve(one.out_dir / "lcurve.csv"), curve(tmp_path / "two" / "lcurve.csv")
    assert [r["task"] for r in a] == [r["task"] for r in b] and len(a) == 4  # steps 0, 3, 6, 9
    if kind == "multi":
        assert {r["task"] for r in a} == {"a", "b"}
    for ra, rb in zip(a, b):
        for k in ra:
            if k.endswith("_val"):
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-7), (ra["step"], k)
    ma, mb = load_model(one.checkpoint), load_model(tmp_path / "two" / "model.ckpt")
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(w, v, rtol=1e-7, atol=1e-9, msg=k)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["model-5.ckpt"]
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_sharded_sampler_splits_the_global_batch_between_ranks(ch4):
    systems = load_systems(str(ch4[0]), ["H", "C"])
    reqs = [NlistRequest(3.0, (8,), True)]
    full = DataSet(systems, reqs, 4, torch.float64)
    shards = [ShardedDataSet(DataSet(systems, reqs, 2, torch.float64), r, 2) for r in range(2)]
    rngs = [np.random.default_rng(0) for _ in range(3)]
    for _ in range(8):  # two passes over the 24 frames: reshuffles stay in step
        whole = full.sample(rngs[0]).coord
        parts = [sh.sample(g).coord for sh, g in zip(shards, rngs[1:])]
        assert torch.equal(torch.stack([parts[0], parts[1]], 1).reshape(whole.shape), whole)
