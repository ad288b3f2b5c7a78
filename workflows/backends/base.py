"""The interface every engine implements. A backend submits a pipeline, finds its runs again, and
answers for them: status, step logs, output artifacts, and the resubmission `lamflow retry`
makes. Everything above it (runs.py, retry.py, results.py, the CLI) talks to a run through
`run.backend`, never by asking which engine it is.

    DebugBackend  (backends/debug.py)  dflow's debug mode: steps are local processes (or
                                       containers) under <workdir>/<run id>/
    ArgoBackend   (backends/argo.py)   Argo Workflows through dflow: inputs on S3, pods on a cluster

A new engine is one more module with one more subclass, listed in backends/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runs import Run
    from ..spec import PipelineSpec


class Backend(ABC):
    name: str = ""  # "debug" | "argo": recorded with each run, printed by `lamflow status` / `list`

    @abstractmethod
    def submit(self, spec: "PipelineSpec", *, check_data: bool = True, **options) -> tuple[str, str | None]:
        """Run the pipeline: (run id, final status), or (run id, None) when it runs on its own."""

    @abstractmethod
    def find(self, run_id: str, workdir: Path) -> "Run | None":
        """The run with this id, or None when this backend does not know it."""

    @abstractmethod
    def runs(self, workdir: Path) -> list[dict]:
        """`lamflow list` rows: {id, mode, status, created, parent}."""

    @abstractmethod
    def workflow(self, run: "Run"):
        """The dflow Workflow of a run, to query its steps."""

    @abstractmethod
    def status(self, run: "Run") -> str:
        """The run's phase (Pending, Running, Succeeded, Failed, ...)."""

    @abstractmethod
    def log(self, run: "Run", step) -> str:
        """The log text of one step (a dflow step of `run.workflow()`)."""

    @abstractmethod
    def fetch(self, run: "Run", artifact, out_dir: Path) -> list[Path]:
        """Copy an output artifact of a step into out_dir; the paths written there."""

    def spec_problems(self, spec: "PipelineSpec") -> list[str]:
        """What this backend needs of a spec beyond `check_spec` (Argo: pinned images)."""
        return []

    def step_times(self, run: "Run") -> dict[str, dict]:
        """display key -> {start, end} in seconds since the run started, where the backend records them."""
        return {}

    @abstractmethod
    def resubmit(self, run: "Run", spec: "PipelineSpec", *, reuse: list, rerun: set[str], keys: list[str],
                 progress) -> tuple[str, str | None]:
        """The retry of `run` with `spec`, reusing the dflow steps `reuse`; the stages in `rerun`
        start from scratch. Returns like `submit`."""

