"""The stage table: every stage of a pipeline, in pipeline order, with its OP, its output
artifacts and whether it fans out. The DAG builder, `lamflow download`, `status` and `retry`
read it; a new stage is one more row here (and its OP in lamflow.ops, its builder in dag.py).

    name       OP (lamflow.ops)  outputs            fan-out (one step per system)
    clean      Clean             cleaned, report, systems
    pretrain   Pretrain          model
    finetune   Finetune          model              yes
    test       Test              report             yes
    distill    Distill           model
    compress   Compress          model
    report     Report            report

`lamflow download --stage S` fetches S's first output; `lamflow retry --from S` reruns S and
every later stage. This module imports nothing heavy (the spec and the CLI use it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    op: str  # the OP class in lamflow.ops (imported on first use)
    outputs: tuple[str, ...]  # output artifacts; the first is what `lamflow download --stage` fetches
    fanout: bool = False  # one step per system (dflow Slices; step keys <name>-<i>)
    parallel: bool = False  # trains data-parallel: resources.gpus > 1 runs torchrun in the pod
    optional: bool = True  # configured under `stages:` (the report always runs)
    reported: str | None = None  # the output the report step reads (default: the first)
    report_input: str | None = None  # the report step's input it arrives as (default: the stage's name)

    @property
    def download(self) -> str:
        return self.outputs[0]

    def op_class(self):
        """The OP class (importing its lamflow.ops module imports dflow)."""
        from lamflow import ops

        return getattr(ops, self.op)


TABLE: tuple[Stage, ...] = (
    Stage("clean", "Clean", ("cleaned", "report", "systems"), reported="report"),  # systems: per fan-out item (ops/clean.py)
    Stage("pretrain", "Pretrain", ("model",), parallel=True),
    Stage("finetune", "Finetune", ("model",), fanout=True, parallel=True),
    Stage("test", "Test", ("report",), fanout=True, report_input="tests"),
    Stage("distill", "Distill", ("model",), parallel=True),  # the student trains under torchrun
    Stage("compress", "Compress", ("model",)),
    Stage("report", "Report", ("report",), optional=False),
)

BY_NAME = {s.name: s for s in TABLE}
ORDER = tuple(s.name for s in TABLE)  # pipeline order: `lamflow retry --from STAGE` reruns STAGE and every later one
STAGES = tuple(s.name for s in TABLE if s.optional)  # the stages a pipeline YAML configures
REPORT = "report"
SLICED = tuple(s.name for s in TABLE if s.fanout)
PARALLEL_STAGES = tuple(s.name for s in TABLE if s.parallel)  # torchrun / TrainJob
HELPER_SUFFIXES = ("-inputs", "-trainjob")  # the extra steps of a multi-node stage (workflows/trainjob.py)


def op(name: str):
    """The OP class of a stage."""
    return BY_NAME[name].op_class()


def later_stages(stage: str) -> set[str]:
    """The stage and every later one (what `retry --from stage` reruns)."""
    return set(ORDER[ORDER.index(stage):])
