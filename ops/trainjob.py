"""A training stage on several nodes: the pieces that run in pods around and inside a Kubeflow
Trainer TrainJob (the TrainJob itself is rendered by lamflow.workflows.trainjob).

    PublishInputs  (Argo pod)      the step's input artifacts -> <store key>/inputs/*.tgz
    TrainJob       (M node pods)   `python -m lamflow.ops.torchrun node`: run_node below
    CollectModel   (Argo pod)      <store key>/results.tgz -> the stage's `model` artifact

The TrainJob's pods are not Argo pods, so they get no Argo artifacts: their inputs and the final
model travel through the checkpoint store (ops/checkpoint_store.py), under the step's key,
which also holds the synced checkpoints a re-created TrainJob resumes from.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import has_model
from .checkpoint_store import CheckpointStore, StoreConfig
from .common import trace, user_errors_are_fatal
from .pretrain import pretrain_outputs

JOB_ENV = "LAMFLOW_JOB"  # base64 JSON: stage parameters (no secrets)
KEY_ENV = "LAMFLOW_CHECKPOINT_KEY"  # the store key (Argo fills in the workflow name)


def encode_job(job: dict) -> str:
    return base64.b64encode(json.dumps(job, sort_keys=True).encode()).decode()


def run_node(_job_file: Path | None = None, env=None, log=print) -> int:
    """One node of a multi-node pretrain: fetch the inputs, resume, train under torchrun (the
    Trainer runtime's PET_* variables give the rendezvous); node 0 publishes the results."""
    from .pretrain import run_pretrain

    env = os.environ if env is None else env
    job = json.loads(base64.b64decode(env[JOB_ENV]))
    store = StoreConfig.from_param({**job["store"], "key": env[KEY_ENV]})
    cs = CheckpointStore(store, log=log)
    root = Path(env.get("LAMFLOW_WORKDIR", "/tmp/lamflow-node"))
    data = cs.get_tree("inputs/data", root / "data")
    cleaned = cs.get_tree("inputs/cleaned", root / "cleaned") if job.get("cleaned") else None
    out = root / "out"
    run_pretrain(job["config"], data, job["datasets"], out, type_map=job["type_map"], cleaned=cleaned,
                 resume_dir=str(root / "work"), store=store, launcher=[], threads=int(job.get("threads", 0)), log=log)
    if env.get("PET_NODE_RANK", "0") == "0" and has_model(out):
        cs.put_tree("results", out)
    return 0


class PublishInputs(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "checkpoint_store": Parameter(dict),            # the stage's store place (key: <prefix>/<run>/<stage>)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({"published": Parameter(dict)})    # name -> {key, size, sha256}

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("pretrain-inputs")
        with user_errors_are_fatal():
            cs = CheckpointStore(StoreConfig.from_param(ip["checkpoint_store"]))
            out = {"data": cs.put_tree("inputs/data", ip["data"])}
            if ip["cleaned"] is not None:
                out["cleaned"] = cs.put_tree("inputs/cleaned", ip["cleaned"])
        return OPIO({"published": out})


class CollectModel(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({"checkpoint_store": Parameter(dict)})  # the TrainJob's store place

    @classmethod
    def get_output_sign(cls):
        return pretrain_outputs()

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("pretrain", "collect")
        out = Path("pretrain")
        with user_errors_are_fatal():
            CheckpointStore(StoreConfig.from_param(ip["checkpoint_store"])).get_tree("results", out)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        return OPIO({"model": out, "summary": summary})
