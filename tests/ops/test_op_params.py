"""Stage OPs take their thread count and device as explicit parameters (not environment
variables), and the training OPs their process count and checkpoint store."""

from __future__ import annotations

import pytest

from lamflow.ops.common import train_config_dict
from lamflow.ops.training import per_rank_threads


def test_threads_are_a_parameter_not_the_environment(monkeypatch):
    monkeypatch.setenv("LAMFLOW_THREADS", "7")  # the old variable: no longer read
    d = train_config_dict({}, ["H"], ["t"], ["v"])
    assert "num_threads" not in d["training"]
    assert train_config_dict({}, ["H"], ["t"], ["v"], threads=3)["training"]["num_threads"] == 3
    own = train_config_dict({"training": {"num_threads": 2}}, ["H"], ["t"], ["v"], threads=3)
    assert own["training"]["num_threads"] == 2  # the stage's own setting wins
    assert per_rank_threads({"training": {"num_threads": 8}}, 4)["training"]["num_threads"] == 2
    assert per_rank_threads({"training": {"num_threads": 3}}, 4)["training"]["num_threads"] == 1


@pytest.mark.parametrize("name", ["Test", "Distill", "Compress", "Pretrain", "Finetune", "Clean", "Report"])
def test_evaluating_and_training_ops_declare_threads_and_device(name):
    from lamflow import ops

    sign = getattr(ops, name).get_input_sign()
    assert sign["threads"].default == 0
    if name in ("Test", "Distill", "Compress", "Report"):
        assert sign["device"].default == "auto"  # the pod's GPU when it has one
    elif name != "Clean":
        assert sign["nproc"].default == 1 and sign["checkpoint_store"].default == {}


def test_dag_gives_each_step_its_threads_and_training_steps_their_ranks():
    from lamflow.workflows.dag import BuildOptions, threads_of
    from lamflow.workflows.spec import Resources

    argo = BuildOptions(mode="argo")
    assert threads_of(Resources(cpu=8), argo) == 8 and threads_of(Resources(cpu="1500m"), argo) == 1
    assert threads_of(Resources(), argo) == 0 and threads_of(Resources(cpu=8), BuildOptions(threads=2)) == 2


def test_each_fine_tuned_system_syncs_to_its_own_checkpoint_key():
    from lamflow.ops.finetune import system_store

    param = {"endpoint": "minio:9000", "bucket": "b", "key": "lamflow/checkpoints/wf-1/finetune", "secure": False}
    assert system_store(param, "ch4").key == "lamflow/checkpoints/wf-1/finetune/ch4"
    assert system_store(param, "water").key != system_store(param, "ch4").key
    assert system_store({}, "ch4") is None  # debug mode: local resume folders only
