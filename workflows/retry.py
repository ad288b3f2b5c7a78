"""`lamflow retry`: a new run of a pipeline that reuses every succeeded step whose inputs did not
change. Step keys hold a hash of each step's inputs (dag.py), so "unchanged" is "same key":
dflow's reuse_step takes the old steps, and the run's backend resubmits (backends/)."""

from __future__ import annotations

from .dag import BuildOptions, stage_of, step_keys
from .dflow_config import EngineError
from .inputs import dataset_digests, localize
from .runs import Run, steps_of
from .spec import PipelineSpec, SpecError, check_spec, resolved_type_map
from .stages import ORDER, later_stages


def retry(run: Run, from_stage: str | None = None, progress=print, spec: PipelineSpec | None = None,
          check_data: bool = True) -> tuple[str | None, str | None]:
    """A new run that reuses every succeeded step whose inputs did not change (dflow reuse_step;
    step keys hold a hash of the step's inputs). `spec`: a fixed pipeline (`--spec`), validated
    like a new submit; by default the run's own. `from_stage`: that stage and every later one
    rerun from scratch (their checkpoint folders are emptied first).
    Debug: runs it now and returns (id, status); Argo: submits it and returns (id, None);
    (None, None) when there is nothing to retry (every step succeeded with these inputs)."""
    if run.meta is None:
        raise EngineError(f"{run.id}: not a lamflow run (no stored spec)")
    if from_stage is not None and from_stage not in ORDER:
        raise EngineError(f"--from {from_stage}: not a stage ({', '.join(ORDER)})")
    if spec is None:
        spec = run.spec
    else:
        problems = check_spec(spec, data=False) + run.backend.spec_problems(spec)
        if problems:
            raise SpecError(problems)
        spec = localize(spec)
        problems = check_spec(spec, data=check_data)
        if problems:
            raise SpecError(problems)
    rerun = later_stages(from_stage) if from_stage else set()
    keys = run_keys(run, spec)
    if from_stage is not None and from_stage not in {stage_of(k) for k in keys}:
        raise EngineError(f"--from {from_stage}: the pipeline has no {from_stage} step "
                          f"(stages: {', '.join(spec.stages.enabled())}, report)")
    reuse = [i.step for i in steps_of(run) if i.phase == "Succeeded" and i.stage not in rerun and i.step.key in keys]
    if not rerun and set(keys) <= {st.key for st in reuse}:
        progress(f"{run.id}: nothing to retry: every step succeeded with these inputs "
                 "(change the pipeline and pass --spec, or rerun stages with --from STAGE)")
        return None, None
    return run.backend.resubmit(run, spec, reuse=reuse, rerun=rerun, keys=keys, progress=progress)


def run_keys(run: Run, spec: PipelineSpec) -> list[str]:
    """The step keys `spec` gives in this run's setting (its type map; changed data re-resolve it)."""
    type_map = run.meta.get("type_map") or resolved_type_map(spec)
    if dataset_digests(spec) != run.meta.get("digests", dataset_digests(run.spec)):
        type_map = resolved_type_map(spec)
    return step_keys(spec, BuildOptions(mode=run.mode, type_map=type_map, digests=dataset_digests(spec)))
