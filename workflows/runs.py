"""Runs: a submitted pipeline, its record and the state of its steps, whichever backend runs it.

A `Run` is an id, the backend that ran it (backends/: debug or argo) and the run's record (the
resolved spec, its type map and inputs: `meta`). Debug runs keep their records in the workdir:

    <workdir>/.lamflow/runs/<run id>.json     the resolved spec, inputs and parent run (for retry)

Argo runs keep the same record as an annotation of the Workflow. `steps_of(run)` lists the keyed
steps in pipeline order with their phase and headline numbers (`lamflow status`, `watch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dag import display_key, stage_of
from .spec import PipelineSpec, spec_from_summary
from .stages import ORDER

if TYPE_CHECKING:
    from .dflow_config import ArgoEnv

META = ".lamflow"
FINAL = ("Succeeded", "Failed", "Error", "Skipped", "Omitted")


@dataclass
class Run:
    id: str
    backend: Any  # a backends.base.Backend (debug or argo); runs.py sits below the backends
    workdir: Path | None = None  # debug runs: the work directory
    meta: dict | None = None  # the run's record (None: not a lamflow run)
    env: "ArgoEnv | None" = None  # Argo runs: the server it runs on

    @property
    def mode(self) -> str:
        """"debug" | "argo" (the word `lamflow status` and `list` print)."""
        return self.backend.name

    @property
    def spec(self) -> PipelineSpec:
        return spec_from_summary(self.meta)

    def workflow(self):
        """The dflow Workflow object of this run (to query its steps)."""
        return self.backend.workflow(self)


# ----------------------------------------------------------------------------- debug run records


def meta_path(workdir: Path, run_id: str) -> Path:
    return workdir / META / "runs" / f"{run_id}.json"


def read_meta(workdir: Path, run_id: str) -> dict | None:
    p = meta_path(workdir, run_id)
    return json.loads(p.read_text()) if p.is_file() else None


def write_meta(workdir: Path, meta: dict) -> None:
    from lamflow.model.io.files import atomic_write_text

    atomic_write_text(meta_path(workdir, meta["id"]), json.dumps(meta, indent=2))


def new_run_id(name: str, workdir: Path) -> str:
    from dflow.utils import randstr

    while True:
        rid = f"{name}-{randstr()}"
        if not (workdir / rid).exists() and not meta_path(workdir, rid).exists():
            return rid


# ----------------------------------------------------------------------------- steps and status


@dataclass
class StepInfo:
    key: str  # as users see it, without the input hash: `test-1`
    stage: str
    phase: str
    system: str | None
    summary: dict | None
    step: object  # the dflow ArgoStep (step.key: the full key)


def unwrap(v):
    """Sliced steps return their output parameters wrapped as [{dflow_list_item: v, order: i}]."""
    if hasattr(v, "recover"):  # dflow's ArgoObjectDict / ArgoObjectList
        v = v.recover()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and "dflow_list_item" in v[0]:
        return v[0]["dflow_list_item"]
    return v


def steps_of(run: Run) -> list[StepInfo]:
    """The keyed steps of a run, in pipeline order."""
    wf = run.workflow()
    spec = run.spec if run.meta else None
    out = []
    for s in wf.query_step():
        key = s.get("key")
        if not key or stage_of(key) not in ORDER:
            continue
        summary = None
        outs = s.get("outputs") or {}
        pars = outs.get("parameters") if hasattr(outs, "get") else None
        if pars is not None and "summary" in pars:
            try:
                summary = unwrap(pars["summary"].value)
            except AttributeError:
                summary = None
        short = display_key(key)
        out.append(StepInfo(short, stage_of(key), s.phase, _system_of(short, spec),
                            summary if isinstance(summary, dict) else None, s))
    out.sort(key=lambda i: (ORDER.index(i.stage), int(i.key.rsplit("-", 1)[1]) if i.key[-1].isdigit() else 0))
    return out


def _system_of(key: str, spec: PipelineSpec | None) -> str | None:
    if spec is None or not key[-1].isdigit():
        return None
    i = int(key.rsplit("-", 1)[1])
    systems = spec.finetune_systems or spec.test_systems
    return systems[i] if i < len(systems) else None


def run_status(run: Run) -> str:
    """The run's phase: Pending, Running, Succeeded, Failed, ..."""
    return run.backend.status(run)
