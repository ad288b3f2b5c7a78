"""PipelineSpec -> dflow DAG. The whole graph is built in `build_dag`, in pipeline order; each
edge is an output a later task consumes. `template()` is the only place that knows images,
resources, GPUs, retries and timeouts. Step keys are the stage names (`finetune-0`, `test-1` for
the per-system fan-out), which `lamflow retry` uses to reuse what succeeded.

    clean ──► pretrain ──► finetune[i] ──► test[i] ──┐
      │          │              └──► distill ──► compress ──► report
      └──────────┴──────────────────────────────────────────────┘
"""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .spec import STAGES, PipelineSpec, Resources, finetune_settings, model_settings, zero_shot_branch

GPU = "nvidia.com/gpu"
REPORT = "report"
ORDER = STAGES + (REPORT,)  # `lamflow retry --from STAGE` reruns STAGE and every later one


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


def stage_of(key: str) -> str:
    """Step key -> stage name (`finetune-2` -> `finetune`)."""
    base = key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key
    return base


def keys_from(spec: PipelineSpec, stage: str) -> set[str]:
    """Stages that `retry --from stage` reruns: the stage and all later ones."""
    i = ORDER.index(stage)
    return set(ORDER[i:])


def cpu_quantity(v) -> str:
    """8 -> "8", 0.5 -> "0.5", "500m" -> "500m" (Kubernetes quantities)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def template(op_cls, res: Resources, opts: BuildOptions, slices=None):
    """One PythonOPTemplate with the stage's image, requests/limits, GPU scheduling and retries."""
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
        retry_on_transient_error=res.retries or None,
        envs=dict(res.envs) or None,
        upload_dflow=False,  # the step images have pydflow installed (deploy/images); render stays offline
        slices=slices,
    )
    return PythonOPTemplate(op_cls, **kw)


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

    from lamflow import ops

    dag = DAG(name=f"{spec.name}-pipeline")
    st = spec.stages
    res = spec.resources_of
    common = {"data": inputs.data}
    resume = (lambda key: f"{opts.resume_root}/{key}") if opts.resume_root else (lambda key: "")
    tasks: dict[str, Any] = {}

    def add(task):
        dag.add(task)
        tasks[task.key if "{{" not in task.key else task.key.split("-{{")[0]] = task
        return task

    if st.clean.enabled:
        clean = add(Task("clean", template(ops.Clean, res("clean"), opts), key="clean",
                         parameters={"datasets": spec.clean_datasets, "config": dict(st.clean.config),
                                     "type_map": opts.type_map},
                         artifacts={**common, **({"pretrained": inputs.pretrained} if inputs.pretrained else {})}))
        common["cleaned"] = clean.outputs.artifacts["cleaned"]

    if st.pretrain.enabled:
        pre = add(Task("pretrain", template(ops.Pretrain, res("pretrain"), opts), key="pretrain",
                       parameters={"config": model_settings(st.pretrain), "datasets": list(st.pretrain.datasets),
                                   "type_map": opts.type_map, "resume_dir": resume("pretrain")},
                       artifacts={**common}))
        pretrained = pre.outputs.artifacts["model"]
    else:
        pretrained = inputs.pretrained

    systems = spec.finetune_systems
    if systems:
        n = len(systems)
        ft = add(Task("finetune", template(ops.Finetune, res("finetune"), opts, slices=Slices(
            "{{item}}", input_parameter=["system", "resume_dir"], output_artifact=["model"], output_parameter=["summary"])),
            key="finetune-{{item}}", with_param=argo_range(n),
            parameters={"system": systems, "resume_dir": [resume(f"finetune-{i}") for i in range(n)],
                        "config": finetune_settings(spec), "type_map": opts.type_map, "branch": st.finetune.branch or "",
                        "freeze_descriptor": st.finetune.freeze_descriptor},
            artifacts={**common, "pretrained": pretrained}))

    if st.test.enabled:
        zero_shot = st.test.zero_shot and pretrained is not None
        zs_branch = zero_shot_branch(spec)
        if systems:
            arts = {**common, "model": ft.outputs.artifacts["model"]}
            if zero_shot:
                arts["pretrained"] = pretrained
            add(Task("test", template(ops.Test, res("test"), opts, slices=Slices(
                "{{item}}", input_parameter=["system"], input_artifact=["model"], output_artifact=["report"],
                output_parameter=["summary"])),
                key="test-{{item}}", with_param=argo_range(len(systems)),
                parameters={"system": systems, "branch": zs_branch, "transfer": st.test.transfer()}, artifacts=arts))
        else:  # no fine-tuning: test the pretrained model on each system
            tsys = spec.test_systems
            add(Task("test", template(ops.Test, res("test"), opts, slices=Slices(
                "{{item}}", input_parameter=["system"], output_artifact=["report"], output_parameter=["summary"])),
                key="test-{{item}}", with_param=argo_range(len(tsys)),
                parameters={"system": tsys, "branch": zs_branch, "transfer": st.test.transfer()},
                artifacts={**common, "model": pretrained}))

    if st.distill.enabled:
        teacher = systems.index(spec.distill_teacher)
        dis = add(Task("distill", template(ops.Distill, res("distill"), opts), key="distill",
                       parameters={"config": dict(st.distill.config), "dataset": spec.distill_dataset,
                                   "teacher_index": teacher},
                       artifacts={**common, "teachers": ft.outputs.artifacts["model"]}))

    if st.compress.enabled:
        add(Task("compress", template(ops.Compress, res("compress"), opts), key="compress",
                 parameters={"config": dict(st.compress.config), "dataset": spec.compress_dataset},
                 artifacts={**common, "model": dis.outputs.artifacts["model"]}))

    arts = {}
    for name, out in (("clean", "report"), ("pretrain", "model"), ("finetune", "model"), ("test", "report"),
                      ("distill", "model"), ("compress", "model")):
        if name in tasks:
            arts["tests" if name == "test" else name] = tasks[name].outputs.artifacts[out]
    params = {"title": f"lamflow run report: {spec.name}"}
    if st.test.enabled and st.distill.enabled:  # the student is tested in the report step, after distill
        arts.update({**common, "student": dis.outputs.artifacts["model"]})
        params.update(student_dataset=spec.distill_dataset, transfer=st.test.transfer())
    add(Task(REPORT, template(ops.Report, spec.resources_of("test") if st.test.enabled else spec.resources, opts),
             key=REPORT, parameters=params, artifacts=arts))
    return dag


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
