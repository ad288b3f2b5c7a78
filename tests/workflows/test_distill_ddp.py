"""The distillation student on several processes: `resources.gpus: N` on distill keeps the teacher's
exploration and labelling in the step's process and trains the student under torchrun (the same
launcher and DDP code as pretrain). Two gloo ranks give the student one process gives with the
doubled batch, and the rendered distill step asks for its GPUs and torchrun ranks."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import TINY, data_path
from test_render import GPU_SELECTOR, GPU_TOLERATION, IMAGE_CPU, IMAGE_GPU, schema_errors
from test_trainjob import tasks_of

from lamflow.model.io.checkpoint import load_model
from lamflow.ops.common import stage_dataset
from lamflow.ops.training import launcher_for

STUDENT = {"model": {"descriptor": {"rcut": 4.0, "rcut_smth": 0.5, "sel": [8, 4], "neuron": [4, 8], "axis_neuron": 2,
                                    "seed": 2},
                     "fitting_net": {"neuron": [8, 8], "seed": 2}},
           "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 2, "scale_by_worker": "none"},
           "training": {"numb_steps": 4, "disp_freq": 2, "save_freq": 2, "seed": 1, "device": "cpu"}}


def distill_config(batch: int) -> dict:
    student = json.loads(json.dumps(STUDENT))
    student["training"]["batch_size"] = batch
    return {"exploration": {"steps": 20, "sample_every": 5, "starts_per_system": 3, "max_frames": 30,
                            "temperatures": [300.0]},  # 15 frames: more than one batch of 4
            "student": student, "test_fraction": 0.25, "seed": 1}


def test_two_process_student_matches_one_process_with_the_doubled_batch(tmp_path):
    from lamflow.ops.distill import run_distill
    from lamflow.ops.pretrain import run_pretrain

    data = tmp_path / "data"
    stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})
    run_pretrain(TINY, data, ["ch4"], tmp_path / "teacher", type_map=["H", "C"], log=lambda *a: None)
    one = run_distill(distill_config(4), tmp_path / "teacher", data, "ch4", tmp_path / "one", log=lambda *a: None)
    lines: list[str] = []
    two = run_distill(distill_config(2), tmp_path / "teacher", data, "ch4", tmp_path / "two", launcher=launcher_for(2),
                      log=lines.append)
    assert any("--nproc_per_node=2" in ln and "lamflow.ops.torchrun" in ln for ln in lines)  # it really ran under torchrun
    assert sum(ln.startswith("explore ") and ln.endswith("frames") for ln in lines) >= 1  # exploration ran here, once
    assert sum("model: se_e2_a" in ln for ln in lines) == 1  # one rank logs
    assert one["counts"] == two["counts"] and one["counts"]["train_frames"] > 8  # the same teacher-labelled data
    ma, mb = load_model(tmp_path / "one" / "model.ckpt"), load_model(tmp_path / "two" / "model.ckpt")
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(w, v, rtol=1e-7, atol=1e-9, msg=k)
    # the report continued on the trained student: same errors against the teacher and DFT
    for key in ("student_vs_teacher", "student"):
        assert two[key]["rmse_f"] == one[key]["rmse_f"] or abs(two[key]["rmse_f"] / one[key]["rmse_f"] - 1) < 1e-6
    assert read_min_nbor(tmp_path / "two" / "model.ckpt") == read_min_nbor(tmp_path / "one" / "model.ckpt")
    assert not (tmp_path / "two" / "work" / "student").exists()  # only out/model.ckpt is kept, as in one process


def read_min_nbor(path):
    from lamflow.model.io.checkpoint import read_checkpoint

    return read_checkpoint(path)["min_nbor_dist"]


def test_distill_with_two_gpus_renders_torchrun_ranks_and_gpu_limits(tmp_path):
    from lamflow.ops.training import torchrun_command
    from lamflow.workflows.render import render_manifest
    from lamflow.workflows.spec import load_spec

    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    gpu2 = {"image": IMAGE_GPU, "cpu": 16, "memory": "64Gi", "gpus": 2, "node_selector": GPU_SELECTOR,
            "tolerations": [GPU_TOLERATION]}
    doc = {"name": "distill-gpus", "datasets": {"ch4": ch4}, "resources": {"image": IMAGE_CPU, "cpu": 2, "memory": "4Gi"},
           "stages": {"pretrain": {"datasets": ["ch4"], **TINY},
                      "finetune": {"systems": ["ch4"], "training": {"numb_steps": 4}},
                      "distill": {"teacher": "ch4", "config": distill_config(2), "resources": gpu2}},
           "engine": {"artifact_repo_key": "lamflow-s3", "util_image": IMAGE_CPU}}
    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump(doc))
    m = render_manifest(load_spec(p))  # validation no longer refuses gpus: 2 on distill
    assert schema_errors(m) == []
    task = tasks_of(m)["distill"]
    params = {q["name"]: q.get("value") for q in task["arguments"]["parameters"]}
    assert params["nproc"] == "2" and params["threads"] == "16"
    tmpl = next(t for t in m["spec"]["templates"] if t["name"] == task["template"])
    assert tmpl["script"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "Distill" in tmpl["script"]["source"]
    # what the pod runs for the student with that nproc: torchrun, one rank per GPU
    cmd = torchrun_command(tmp_path / "job.json", launcher_for(int(params["nproc"])))
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-3:-1] == ["lamflow.ops.torchrun", "worker"]
