"""What a run leaves: `lamflow download` (the report, or one stage's output artifacts), `lamflow
logs` (each step's log) and `lamflow list` (backends/: every backend's runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .backends import list_runs
from .dflow_config import EngineError
from .runs import Run, steps_of
from .stages import HELPER_SUFFIXES, TABLE

OUTPUT_OF = {s.name: s.download for s in TABLE}  # what `lamflow download --stage S` fetches


def download(run: Run, out_dir: Path, stage: str | None = None) -> list[Path]:
    """Fetch the report (default) or one stage's output artifacts into out_dir."""
    stage = stage or "report"
    if stage not in OUTPUT_OF:
        raise EngineError(f"--stage {stage}: not a stage ({', '.join(OUTPUT_OF)})")
    steps = [i for i in steps_of(run) if i.stage == stage and i.phase == "Succeeded"
             and not i.key.endswith(HELPER_SUFFIXES)]  # a multi-node stage's inputs/TrainJob steps have no outputs
    if not steps:
        raise EngineError(f"{run.id}: stage {stage} has no succeeded step (yet)")
    out_dir.mkdir(parents=True, exist_ok=True)
    got = []
    for i in steps:
        got += run.backend.fetch(run, i.step.outputs.artifacts[OUTPUT_OF[stage]], out_dir)
    if stage == "report":  # the report's files go straight into out_dir
        inner = out_dir / "report"
        if inner.is_dir():
            for f in inner.iterdir():
                dst = out_dir / f.name
                if dst.is_dir():
                    shutil.rmtree(dst)
                shutil.move(str(f), dst)
            inner.rmdir()
        got = sorted(p for p in out_dir.iterdir() if p.name != ".dflow")
    return sorted(set(got))


def logs(run: Run, stage: str) -> list[tuple[str, str]]:
    """(step key, log text) for each step of a stage (or one step key)."""
    steps = [i for i in steps_of(run) if i.stage == stage or i.key == stage]
    if not steps:
        raise EngineError(f"{run.id}: no step of stage {stage!r}")
    return [(i.key, run.backend.log(run, i.step)) for i in steps]


__all__ = ["OUTPUT_OF", "download", "list_runs", "logs"]
