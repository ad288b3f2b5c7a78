"""`resources.nodes: M` (M > 1) on pretrain: the stage runs as a Kubeflow Trainer v2 TrainJob
(runtime `torch-distributed`, on JobSet) that the Argo workflow creates and waits on through a
resource template. Three tasks replace the one pretrain task:

    pretrain-inputs    PythonOP: input artifacts -> the checkpoint store (<store key>/inputs/*.tgz)
    pretrain-trainjob  Argo resource template: create the TrainJob; succeed on its Complete
                       condition, fail on Failed; Argo retries it (a new TrainJob resumes from the
                       synced checkpoint)
    pretrain           PythonOP: the final model from the store -> the `model` artifact later
                       stages consume (same key and outputs as a one-pod pretrain)

Every node pod runs `python -m lamflow.ops.torchrun node` (ops/trainjob.py: run_node). The
TrainJob is rendered here, offline, and checked against the Trainer v2.3.0 CRD in the tests; it
was not run on a cluster.
"""

from __future__ import annotations

import yaml

from .dag import GPU, BuildOptions, cpu_quantity, preemption_retry, secret_envs, store_param, template, threads_of
from .spec import PipelineSpec, model_settings

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
# Argo parses these with the Kubernetes label-selector parser and reads each key as a gjson path
# (argoexec resource.go), so a key must be a plain dotted path (no `#(type=="Complete")` queries
# into the conditions list). The torch-distributed runtime has one replicated job ("node"):
# jobsStatus[0] counts its child Jobs that succeeded or failed.
SUCCESS = "status.jobsStatus.0.succeeded > 0"
FAILURE = "status.jobsStatus.0.failed > 0"


def trainjob_manifest(spec: PipelineSpec, opts: BuildOptions, has_cleaned: bool) -> dict:
    """The TrainJob object (a dict); Argo substitutes {{workflow.name}} when it creates it."""
    from lamflow.ops.trainjob import JOB_ENV, KEY_ENV, encode_job

    res = spec.resources_of("pretrain")
    store = store_param(spec, opts, "pretrain")
    job = {"config": model_settings(spec.stages.pretrain), "datasets": list(spec.stages.pretrain.datasets),
           "type_map": list(opts.type_map), "cleaned": has_cleaned, "threads": threads_of(res, opts),
           "store": {k: v for k, v in store.items() if k != "key"}}
    secret = spec.engine.checkpoints.credentials_secret
    env = [{"name": JOB_ENV, "value": encode_job(job)}, {"name": KEY_ENV, "value": store["key"]}]
    env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for name, key in (("LAMFLOW_S3_ACCESS_KEY", "accesskey"), ("LAMFLOW_S3_SECRET_KEY", "secretkey"))]
    env += [{"name": k, "value": v} for k, v in res.envs.items()]
    requests, limits = {}, {GPU: str(res.gpus)}
    if res.cpu is not None:
        requests["cpu"] = cpu_quantity(res.cpu)
    if res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    trainer = {"image": res.image or opts.default_image,
               "command": ["python3", "-m", "lamflow.ops.torchrun", "node"],
               "numNodes": res.nodes, "numProcPerNode": res.gpus,
               "resourcesPerNode": {"limits": limits, **({"requests": requests} if requests else {})},
               "env": env}
    pod = {}
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    body = {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                           "name": spec.engine.trainer_runtime},
            "trainer": trainer}
    if pod:
        body["runtimePatches"] = [{"manager": "lamflow.io/pipeline", "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    if res.timeout:
        body["activeDeadlineSeconds"] = res.timeout
    return {"apiVersion": TRAINER_API, "kind": "TrainJob",
            "metadata": {"generateName": f"{spec.name}-pretrain-"[:57],
                         "labels": {"lamflow.io/pipeline": spec.name, "lamflow.io/stage": "pretrain",
                                    "app.kubernetes.io/managed-by": "lamflow"}},
            "spec": body}


def trainjob_template(spec: PipelineSpec, opts: BuildOptions, has_cleaned: bool):
    """The Argo resource template that creates the TrainJob and waits for its conditions."""
    from argo.workflows.client import V1alpha1ResourceTemplate
    from dflow.op_template import ScriptOPTemplate

    res = spec.resources_of("pretrain")
    manifest = yaml.safe_dump(trainjob_manifest(spec, opts, has_cleaned), sort_keys=False)
    t = ScriptOPTemplate(name="pretrain-trainjob", resource=V1alpha1ResourceTemplate(
        action="create", manifest=manifest, success_condition=SUCCESS, failure_condition=FAILURE,
        set_owner_reference=True))  # the TrainJob goes away with the Workflow
    # a failed or preempted TrainJob is created again (generateName) and resumes from the store
    t.retry_strategy = preemption_retry(max(res.retries, spec.engine.preemption_retries), expression=None)
    if res.timeout:
        t.timeout = f"{res.timeout}s"
    return t


def add_trainjob_stage(dag, add, spec: PipelineSpec, opts: BuildOptions, common: dict):
    """The three tasks of a multi-node pretrain; returns the one with the `model` output."""
    from dflow import Task

    from lamflow import ops

    store = store_param(spec, opts, "pretrain")
    cpu = spec.resources  # the helper pods are small CPU pods
    envs = secret_envs(spec)
    pub = add(Task("pretrain-inputs", template(ops.PublishInputs, cpu, opts, envs=envs), key="pretrain-inputs",
                   parameters={"checkpoint_store": store}, artifacts={k: v for k, v in common.items()
                                                                      if k in ("data", "cleaned")}))
    job = add(Task("pretrain-trainjob", trainjob_template(spec, opts, "cleaned" in common), key="pretrain-trainjob",
                   dependencies=[pub]))
    return add(Task("pretrain", template(ops.CollectModel, cpu, opts, envs=envs), key="pretrain",
                    parameters={"checkpoint_store": store}, dependencies=[job]))
