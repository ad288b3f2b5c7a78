"""The engines a pipeline runs on, behind one interface (base.py: `Backend`).

    DEBUG  dflow's debug mode, here and now (debug.py; `lamflow submit --debug`)
    ARGO   Argo Workflows through dflow (argo.py; `lamflow submit`)

`find_run` asks each in turn for a run id; `list_runs` collects every backend's runs.
"""

from __future__ import annotations

import os

from ..dflow_config import EngineError, workdir_of
from ..runs import Run
from .argo import ArgoBackend
from .base import Backend
from .debug import DebugBackend

DEBUG = DebugBackend()
ARGO = ArgoBackend()
BACKENDS: tuple[Backend, ...] = (DEBUG, ARGO)  # the order `find_run` asks them in


def find_run(run_id: str, workdir: str | os.PathLike | None = None) -> Run:
    """The run with this id: a debug run in the workdir, else an Argo run (when LAMFLOW_ARGO_HOST is set)."""
    wd = workdir_of(override=workdir)
    for backend in BACKENDS:
        run = backend.find(run_id, wd)
        if run is not None:
            return run
    raise EngineError(f"no run {run_id!r} in {wd} (debug runs), and LAMFLOW_ARGO_HOST is not set (Argo runs)")


def list_runs(workdir: str | os.PathLike | None = None) -> list[dict]:
    """Debug runs in the workdir, and Argo runs when LAMFLOW_ARGO_HOST is set."""
    wd = workdir_of(override=workdir)
    return [row for backend in BACKENDS for row in backend.runs(wd)]


__all__ = ["ARGO", "BACKENDS", "DEBUG", "Backend", "find_run", "list_runs"]
