"""PipelineSpec -> dflow DAG. The whole graph is built in `build_dag`, in pipeline order; each
edge is an output a later task consumes. `template()` is the only place that knows images,
resources, GPUs, retries and timeouts. Step keys are the stage name, the index of the system for
the per-system fan-out, and a hash of everything the step's result depends on (its settings, the
digests of the data it reads, and the hashes of the steps it consumes): `pretrain-h1f2e3d4c`,
`test-1-h0a9b8c7d`. `lamflow retry` reuses a succeeded step only when its key is unchanged, so a
changed setting reruns its step and every step downstream, and nothing else. Users see the keys
without the hash (`test-1`, `display_key`).

    clean ──► pretrain ──► finetune[i] ──► test[i] ──┐
      │          │              └──► distill ──► compress ──► report
      └──────────┴──────────────────────────────────────────────┘
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from .spec import PipelineSpec, Resources, finetune_settings, model_settings, zero_shot_branch
from .stages import HELPER_SUFFIXES, ORDER, REPORT, SLICED, STAGES, TABLE, later_stages, op

GPU = "nvidia.com/gpu"


@dataclass
class Inputs:
    """The workflow's input artifacts (dflow artifact objects)."""

    data: Any  # staged datasets (ops.common layout)
    pretrained: Any | None = None  # folder with model.ckpt, when finetune starts from a given checkpoint


@dataclass
class BuildOptions:
    mode: str = "debug"  # "debug" (local processes) or "argo"
    type_map: list[str] = field(default_factory=list)
    resume_root: str | None = None  # debug: checkpoints that survive a failed step (one folder per step)
    python: str = sys.executable  # debug: the interpreter that runs each step
    default_image: str = "lamflow:local"  # debug: dflow wants an image name; it is not used
    digests: dict[str, str] = field(default_factory=dict)  # dataset name (and "pretrained") -> content digest
    threads: int = 0  # torch threads per step in debug mode (0: torch's default)
    checkpoint_run: str = "{{workflow.name}}"  # argo: names the checkpoint keys; a retry passes its root run's id
    inputs_key: str | None = None  # argo: S3 prefix of the workflow's inputs (per-system data under <prefix>/systems)
    # argo: builds a multi-node pretrain (resources.nodes > 1) as its own tasks, given by the backend
    # (workflows/trainjob.py: add_trainjob_stage); None: the stage runs in one pod
    multinode: Callable | None = None


PREEMPTED = 'lastRetry.status == "Error" || (lastRetry.status == "Failed" && asInt(lastRetry.exitCode) == 1)'


def preemption_retry(limit: int, expression: str | None = PREEMPTED) -> dict:
    """Argo retryStrategy of a training step: retry when the pod errored (node preempted, pod
    evicted or deleted) or exited with dflow's TransientError (1), never on a FatalError (2); the
    retried pod resumes from the synced checkpoint (ops/checkpoint_store.py)."""
    out = {"limit": limit, "retryPolicy": "Always", "backoff": {"duration": "1m", "factor": 2, "maxDuration": "1h"}}
    if expression:
        out["expression"] = expression
    return out


def threads_of(res: Resources, opts: BuildOptions) -> int:
    """torch threads of a step: debug.threads locally; on Argo the pod's CPU request (whole CPUs)."""
    if opts.mode == "debug":
        return opts.threads
    cpu = res.cpu
    if cpu is None:
        return 0
    if isinstance(cpu, str) and cpu.endswith("m"):
        return max(1, int(cpu[:-1]) // 1000)
    return max(1, int(float(cpu)))


def secret_envs(spec: PipelineSpec) -> dict:
    """The checkpoint store's key pair, from the artifact repository's Secret (never a value)."""
    from dflow.op_template import Secret  # a reference to an existing Secret (no value: nothing is created)

    name = spec.engine.checkpoints.credentials_secret
    return {env: Secret(name=name, key=key)
            for env, key in (("LAMFLOW_S3_ACCESS_KEY", "accesskey"), ("LAMFLOW_S3_SECRET_KEY", "secretkey"))}


def store_param(spec: PipelineSpec, opts: BuildOptions, stage: str) -> dict:
    """Where a training step syncs its checkpoints: <prefix>/<run>/<stage> ({} in debug mode,
    which keeps its local resume folders, or when engine.checkpoints is disabled)."""
    c = spec.engine.checkpoints
    if opts.mode != "argo" or not c.enabled:
        return {}
    return {"endpoint": c.endpoint, "bucket": c.bucket, "secure": c.secure,
            "key": f"{c.prefix.strip('/')}/{opts.checkpoint_run}/{stage}"}


HASH_RE = re.compile(r"-h[0-9a-f]{8}$")


def display_key(key: str) -> str:
    """Step key without its input hash (`test-1-h0a9b8c7d` -> `test-1`)."""
    return HASH_RE.sub("", key)


def stage_of(key: str) -> str:
    """Step key -> stage name (`finetune-2-h0a9b8c7d` -> `finetune`, `pretrain-trainjob` -> `pretrain`)."""
    key = display_key(key)
    base = key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key
    for suffix in HELPER_SUFFIXES:
        if base.endswith(suffix) and base[: -len(suffix)] in STAGES:
            return base[: -len(suffix)]  # reused with their stage by `lamflow retry`
    return base


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def input_hashes(spec: PipelineSpec, opts: BuildOptions) -> dict[str, str]:
    """stage -> hash of what its steps' results depend on: own settings, data digests, type map,
    and the hashes of the stages whose outputs it reads (so a change propagates downstream).
    Resources are left out: where a step runs does not change what it computes."""
    st, d = spec.stages, opts.digests
    data = lambda names: {n: d.get(n, n) for n in names}  # noqa: E731
    h: dict[str, str] = {}
    up = lambda *names: {n: h[n] for n in names if n in h}  # noqa: E731
    if st.clean.enabled:
        h["clean"] = _digest("clean", dict(st.clean.config), data(spec.clean_datasets), opts.type_map, d.get("pretrained"),
                             fanout_systems(spec))  # the per-system output is laid out by the fan-out
    if st.pretrain.enabled:
        h["pretrain"] = _digest("pretrain", model_settings(st.pretrain), data(st.pretrain.datasets), opts.type_map,
                                up("clean"))
    if spec.finetune_systems:
        h["finetune"] = _digest("finetune", finetune_settings(spec), data(spec.finetune_systems), opts.type_map,
                                st.finetune.branch, st.finetune.freeze_descriptor, up("clean", "pretrain"),
                                None if st.pretrain.enabled else d.get("pretrained"))
    if st.test.enabled:
        h["test"] = _digest("test", st.test.zero_shot, spec.test_systems, data(spec.test_systems), zero_shot_branch(spec),
                            up("clean", "pretrain", "finetune"), None if st.pretrain.enabled else d.get("pretrained"))
    if st.distill.enabled:
        h["distill"] = _digest("distill", dict(st.distill.config), spec.distill_dataset, spec.distill_teacher,
                               data([spec.distill_dataset]), up("clean", "finetune"))
    if st.compress.enabled:
        h["compress"] = _digest("compress", dict(st.compress.config), spec.compress_dataset,
                                data([spec.compress_dataset]), up("clean", "distill"))
    h[REPORT] = _digest(REPORT, spec.name, {k: v for k, v in h.items()})
    return h


def step_key(stage: str, h: dict[str, str], item: str | int | None = None) -> str:
    """The dflow key of a stage's step (`item`: "{{item}}" in the template, or the index)."""
    return f"{stage}-{item}-h{h[stage]}" if item is not None else f"{stage}-h{h[stage]}"


def step_keys(spec: PipelineSpec, opts: BuildOptions) -> list[str]:
    """Every step key of the workflow, the fan-out expanded, in pipeline order."""
    h = input_hashes(spec, opts)
    out = []
    for stage in ORDER:
        if stage not in h:
            continue
        if stage in SLICED:
            n = len(spec.finetune_systems if stage == "finetune" else spec.test_systems)
            out += [step_key(stage, h, i) for i in range(n)]
        else:
            out.append(step_key(stage, h))
    return out


def keys_from(spec: PipelineSpec, stage: str) -> set[str]:
    """Stages that `retry --from stage` reruns: the stage and all later ones."""
    return later_stages(stage)


def cpu_quantity(v) -> str:
    """8 -> "8", 0.5 -> "0.5", "500m" -> "500m" (Kubernetes quantities)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def template(op_cls, res: Resources, opts: BuildOptions, slices=None, retry: dict | None = None, envs: dict | None = None):
    """One PythonOPTemplate with the stage's image, requests/limits, GPU scheduling and retries.
    `retry`: an Argo retryStrategy instead of the transient-error one; `envs`: extra variables
    (values or Secret references)."""
    from dflow.python import PythonOPTemplate
    from kubernetes.client import V1Toleration

    requests, limits = {}, {}
    if res.cpu is not None:
        requests["cpu"] = cpu_quantity(res.cpu)
    if res.memory is not None:
        requests["memory"] = res.memory
        limits["memory"] = res.memory
    if res.gpus:
        limits[GPU] = str(res.gpus)  # GPUs as limits only (Kubernetes: whole devices, never shared)
    kw = dict(
        image=res.image or opts.default_image,
        image_pull_policy=res.image_pull_policy,
        command=[opts.python] if opts.mode == "debug" else ["python3"],
        requests=requests or None,
        limits=limits or None,
        node_selector=dict(res.node_selector) or None,
        tolerations=[V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in res.tolerations]
        or None,
        timeout=res.timeout,
        retry_on_transient_error=(res.retries or None) if retry is None else None,
        envs={**res.envs, **(envs or {})} or None,
        upload_dflow=False,  # the step images have pydflow installed (deploy/images); render stays offline
        slices=slices,
    )
    t = PythonOPTemplate(op_cls, **kw)
    if retry is not None and opts.mode == "argo":
        t.retry_strategy = retry
    return t


def training_template(op_cls, spec: PipelineSpec, stage: str, opts: BuildOptions, slices=None):
    """A training stage's template: preemption retries and the checkpoint store's credentials on Argo."""
    res = spec.resources_of(stage)
    if opts.mode != "argo":
        return template(op_cls, res, opts, slices)
    retry = preemption_retry(max(res.retries, spec.engine.preemption_retries))
    envs = secret_envs(spec) if spec.engine.checkpoints.enabled else None
    return template(op_cls, res, opts, slices, retry=retry, envs=envs)


@contextmanager
def seeded(seed: str):
    """dflow names templates with random suffixes; seed them so one spec renders one manifest."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def build_dag(spec: PipelineSpec, inputs: Inputs, opts: BuildOptions):
    from dflow import DAG, Task, argo_range
    from dflow.python import Slices


    dag = DAG(name=f"{spec.name}-pipeline")
    st = spec.stages
    res = spec.resources_of
    common = {"data": inputs.data}
    resume = (lambda key: f"{opts.resume_root}/{key}") if opts.resume_root else (lambda key: "")
    tasks: dict[str, Any] = {}
    h = input_hashes(spec, opts)

    def add(task):
        dag.add(task)
        tasks[stage_of(task.key) if "{{" not in task.key else task.key.split("-{{")[0]] = task
        return task

    if st.clean.enabled:
        clean = add(Task("clean", template(op("clean"), res("clean"), opts), key=step_key("clean", h),
                         parameters={"datasets": spec.clean_datasets, "config": dict(st.clean.config),
                                     "type_map": opts.type_map, "fanout": fanout_systems(spec),
                                     "threads": threads_of(res("clean"), opts)},
                         artifacts={**common, **({"pretrained": inputs.pretrained} if inputs.pretrained else {})}))
        common["cleaned"] = clean.outputs.artifacts["cleaned"]

    if st.pretrain.enabled and res("pretrain").nodes > 1 and opts.multinode is not None:
        pre = opts.multinode(dag, add, spec, opts, common)
        pretrained = pre.outputs.artifacts["model"]
    elif st.pretrain.enabled:
        pre = add(Task("pretrain", training_template(op("pretrain"), spec, "pretrain", opts), key=step_key("pretrain", h),
                       parameters={"config": model_settings(st.pretrain), "datasets": list(st.pretrain.datasets),
                                   "type_map": opts.type_map, "resume_dir": resume(step_key("pretrain", h)),
                                   # keyed by the hashed step key: a changed setting never resumes an old run
                                   "checkpoint_store": store_param(spec, opts, step_key("pretrain", h)),
                                   "nproc": max(1, res("pretrain").gpus), "threads": threads_of(res("pretrain"), opts)},
                       artifacts={**common}))
        pretrained = pre.outputs.artifacts["model"]
    else:
        pretrained = inputs.pretrained

    systems = spec.finetune_systems
    if systems:
        n = len(systems)
        ft = add(Task("finetune", training_template(op("finetune"), spec, "finetune", opts, slices=Slices(
            "{{item}}", input_parameter=["system", "resume_dir"], output_artifact=["model"], output_parameter=["summary"])),
            key=step_key("finetune", h, "{{item}}"), with_param=argo_range(n),
            parameters={"system": systems, "resume_dir": [resume(step_key("finetune", h, i)) for i in range(n)],
                        "config": finetune_settings(spec), "type_map": opts.type_map, "branch": st.finetune.branch or "",
                        "freeze_descriptor": st.finetune.freeze_descriptor,
                        "checkpoint_store": store_param(spec, opts, step_key("finetune", h)),
                        "nproc": max(1, res("finetune").gpus), "threads": threads_of(res("finetune"), opts)},
            artifacts={**common, **system_data(opts, "finetune"), **cleaned_system(tasks, "finetune"),
                       "pretrained": pretrained}))

    if st.test.enabled:
        zero_shot = st.test.zero_shot and pretrained is not None
        zs_branch = zero_shot_branch(spec)
        if systems:
            arts = {**common, **system_data(opts, "finetune"), **cleaned_system(tasks, "finetune"),
                    "model": ft.outputs.artifacts["model"]}
            if zero_shot:
                arts["pretrained"] = pretrained
            add(Task("test", template(op("test"), res("test"), opts, slices=Slices(
                "{{item}}", input_parameter=["system"], input_artifact=["model"], output_artifact=["report"],
                output_parameter=["summary"])),
                key=step_key("test", h, "{{item}}"), with_param=argo_range(len(systems)),
                parameters={"system": systems, "branch": zs_branch, "threads": threads_of(res("test"), opts),
                            "transfer": st.test.transfer()},
                artifacts=arts))
        else:  # no fine-tuning: test the pretrained model on each system
            tsys = spec.test_systems
            add(Task("test", template(op("test"), res("test"), opts, slices=Slices(
                "{{item}}", input_parameter=["system"], output_artifact=["report"], output_parameter=["summary"])),
                key=step_key("test", h, "{{item}}"), with_param=argo_range(len(tsys)),
                parameters={"system": tsys, "branch": zs_branch, "threads": threads_of(res("test"), opts),
                            "transfer": st.test.transfer()},
                artifacts={**common, **system_data(opts, "test"), **cleaned_system(tasks, "test"), "model": pretrained}))

    if st.distill.enabled:
        teacher = systems.index(spec.distill_teacher)
        dis = add(Task("distill", template(op("distill"), res("distill"), opts), key=step_key("distill", h),
                       parameters={"config": dict(st.distill.config), "dataset": spec.distill_dataset,
                                   "teacher_index": teacher, "threads": threads_of(res("distill"), opts),
                                   "nproc": max(1, res("distill").gpus)},  # > 1: the student trains under torchrun
                       artifacts={**common, "teachers": ft.outputs.artifacts["model"]}))

    if st.compress.enabled:
        add(Task("compress", template(op("compress"), res("compress"), opts), key=step_key("compress", h),
                 parameters={"config": dict(st.compress.config), "dataset": spec.compress_dataset,
                             "threads": threads_of(res("compress"), opts)},
                 artifacts={**common, "model": dis.outputs.artifacts["model"]}))

    arts = {}
    for s in TABLE:  # each stage's result, as the report step's input of its name
        if s.name in tasks and s.name != REPORT:
            arts[s.report_input or s.name] = tasks[s.name].outputs.artifacts[s.reported or s.download]
    params = {"title": f"lamflow run report: {spec.name}"}
    if st.test.enabled and st.distill.enabled:  # the student is tested in the report step, after distill
        arts.update({**common, "student": dis.outputs.artifacts["model"]})
        params.update(student_dataset=spec.distill_dataset, transfer=st.test.transfer())
    report_res = spec.resources_of("test") if st.test.enabled else spec.resources
    params["threads"] = threads_of(report_res, opts)
    add(Task(REPORT, template(op(REPORT), report_res, opts), key=step_key(REPORT, h), parameters=params, artifacts=arts))
    return dag


def system_data(opts: BuildOptions, fanout: str) -> dict:
    """Argo: the `data` artifact of a fan-out step is its own system only: the item-th object under
    <inputs>/systems/<fanout>/ (uploaded per system by the engine), not the whole data set."""
    if opts.mode != "argo" or not opts.inputs_key:
        return {}
    from dflow import S3Artifact

    return {"data": S3Artifact(key=f"{opts.inputs_key}/systems/{fanout}").sub_path("{{item}}")}


def fanout_systems(spec: PipelineSpec) -> dict[str, list[str]]:
    """The per-system fan-out: {"finetune": systems}, or {"test": systems} without fine-tuning
    (what upload_system_data splits the raw inputs by, and the clean stage its `systems` output)."""
    if spec.finetune_systems:
        return {"finetune": list(spec.finetune_systems)}
    return {"test": list(spec.test_systems)} if spec.stages.test.enabled else {}


def cleaned_system(tasks: dict, fanout: str) -> dict:
    """The `cleaned` artifact of a fan-out step: only its own system's cleaned data, the item-th
    sub-path of the clean step's `systems` output (ops/clean.py), not every cleaned dataset."""
    if "clean" not in tasks:
        return {}
    from lamflow.ops.clean import SYSTEMS_DIR

    systems = tasks["clean"].outputs.artifacts["systems"]
    art = systems.sub_path(f"{SYSTEMS_DIR}/{fanout}/{{{{item}}}}")  # dflow keeps the OP's folder name in the artifact
    art.step = systems.step  # sub_path deep-copies the producing task; the DAG's dependency must be the task itself
    return {"cleaned": art}


def build_workflow(spec: PipelineSpec, inputs: Inputs, opts: BuildOptions, *, labels=None, annotations=None,
                   seed: str | None = None, **engine_kw):
    """The dflow Workflow (not submitted). Templates are built with seeded names when `seed` is given."""
    from dflow import Workflow

    with seeded(seed) if seed is not None else _nothing():
        dag = build_dag(spec, inputs, opts)
    return Workflow(name=spec.name, dag=dag, labels=labels or {}, annotations=annotations or {}, **engine_kw)


@contextmanager
def _nothing():
    yield
