"""The checks that need the whole spec but no files: names of datasets, stages that need other
stages, GPU settings on GPU stages only, where label-free datasets may go. `PipelineSpec`'s
validator runs them (schema.py), so `load_spec` reports them all at once."""

from __future__ import annotations

from ..stages import PARALLEL_STAGES, STAGES
from .base import as_list, is_s3


def reference_problems(spec) -> list[str]:
    """Cross-references between sections of a PipelineSpec: names of datasets, stages that need
    other stages, resources, label-free datasets."""
    out: list[str] = []
    names = set(spec.datasets)
    st = spec.stages

    def need(path: str, ref: str | None) -> None:
        if ref is not None and ref not in names:
            out.append(f"{path}: unknown dataset {ref!r} (datasets: {', '.join(spec.datasets)})")

    if st.clean.enabled and st.clean.datasets is not None:
        for i, d in enumerate(st.clean.datasets):
            need(f"stages.clean.datasets[{i}]", d)
    if st.pretrain.enabled:
        if not st.pretrain.datasets:
            out.append("stages.pretrain.datasets: name at least one dataset to pretrain on")
        for i, d in enumerate(st.pretrain.datasets):
            need(f"stages.pretrain.datasets[{i}]", d)
    if st.finetune.enabled:
        if not st.finetune.systems:
            out.append("stages.finetune.systems: name at least one downstream dataset")
        for i, d in enumerate(st.finetune.systems):
            need(f"stages.finetune.systems[{i}]", d)
            if d in names and spec.datasets[d].valid is None:
                out.append(f"stages.finetune.systems[{i}]: dataset {d!r} has no valid split (datasets.{d}.valid)")
        if len(set(st.finetune.systems)) != len(st.finetune.systems):
            out.append("stages.finetune.systems: a dataset is listed twice")
        if not st.pretrain.enabled and st.finetune.pretrained is None:
            out.append("stages.finetune.pretrained: pretrain is disabled, so give a pretrained checkpoint to start from")
    if st.test.enabled:
        if st.test.systems is not None:
            for i, d in enumerate(st.test.systems):
                need(f"stages.test.systems[{i}]", d)
        if not (st.finetune.enabled or st.pretrain.enabled):
            out.append("stages.test: needs a model: enable pretrain or finetune")
        elif st.test.systems is not None and st.finetune.enabled and list(st.test.systems) != list(st.finetune.systems):
            out.append("stages.test.systems: with finetune enabled the test stage tests each fine-tuned system "
                       "(stages.finetune.systems); leave systems out")
    if st.distill.enabled:
        if not st.finetune.enabled:
            out.append("stages.distill: needs a fine-tuned teacher: enable finetune")
        elif st.distill.teacher is not None and st.distill.teacher not in st.finetune.systems:
            out.append(f"stages.distill.teacher: {st.distill.teacher!r} is not one of stages.finetune.systems")
        need("stages.distill.dataset", st.distill.dataset)
    if st.compress.enabled:
        if not st.distill.enabled:
            out.append("stages.compress: compresses the distilled student: enable distill")
        need("stages.compress.dataset", st.compress.dataset)
    if spec.type_map is not None and len(set(spec.type_map)) != len(spec.type_map):
        out.append("type_map: an element is listed twice")
    on_s3 = sorted({n for n, d in spec.datasets.items() for s in ("train", "valid", "test") for p in as_list(getattr(d, s))
                    if is_s3(p)})
    if spec.type_map is None and on_s3:
        out.append(f"type_map: required when datasets are on S3 ({', '.join(on_s3)}): their elements are not known offline")
    for name in ("pretrain", "finetune"):
        st_ = getattr(st, name)
        tm = st_.model.get("type_map") if isinstance(st_.model, dict) else None
        if st_.enabled and spec.type_map is not None and tm is not None and list(tm) != list(spec.type_map):
            out.append(f"stages.{name}.model.type_map: {tm} differs from the pipeline's type_map {spec.type_map}")
    for name in STAGES:
        out += resource_problems(spec, name)
    out += label_free_problems(spec)
    return out


def resource_problems(spec, stage: str) -> list[str]:
    """GPU settings belong to GPU stages only (CPU pods must not land on, or tolerate, GPU nodes)."""
    r = spec.resources_of(stage)
    where = f"stages.{stage}.resources"
    out = []
    enabled = getattr(spec.stages, stage).enabled
    if r.gpus > 1 and enabled and stage not in PARALLEL_STAGES:
        out.append(f"{where}.gpus: {r.gpus}: stage {stage} does not train data-parallel (only "
                   f"{', '.join(PARALLEL_STAGES)} run under torchrun); use gpus: 1")
    if r.nodes > 1 and enabled and stage != "pretrain":
        out.append(f"{where}.nodes: {r.nodes}: only pretrain runs on several nodes (a TrainJob); "
                   f"{stage} runs in one pod (use gpus for several GPUs)")
    if r.nodes > 1 and enabled and stage == "pretrain" and not spec.engine.checkpoints.enabled:
        out.append(f"{where}.nodes: {r.nodes}: a multi-node stage hands its model over through the checkpoint store; "
                   "set engine.checkpoints.enabled: true")
    if r.nodes > 1 and enabled and stage == "pretrain" and r.gpus == 0:
        out.append(f"{where}.nodes: {r.nodes}: a multi-node stage needs gpus (per node)")
    if r.gpus == 0:
        for k in r.node_selector:
            if k.startswith("nvidia.com/"):
                out.append(f"{where}.node_selector: {k} on a CPU stage (gpus: 0) would put it on GPU nodes")
        for i, t in enumerate(r.tolerations):
            if t.key.startswith("nvidia.com/"):
                out.append(f"{where}.tolerations[{i}]: tolerating {t.key} on a CPU stage (gpus: 0) lets it onto GPU nodes")
    return out


def label_free_problems(spec) -> list[str]:
    """Where label-free datasets and denoise heads may be used (no data read)."""
    out: list[str] = []
    st = spec.stages
    free = {n for n, d in spec.datasets.items() if d.label_free}

    def why(n: str) -> str:
        return f"dataset {n!r} is label-free (datasets.{n}.label_free: no energies or forces)"

    if st.pretrain.enabled:
        for n in st.pretrain.denoise:
            if n not in st.pretrain.datasets:
                out.append(f"stages.pretrain.denoise.{n}: not one of stages.pretrain.datasets "
                           f"({', '.join(st.pretrain.datasets)})")
        for i, n in enumerate(st.pretrain.datasets):
            if n in free and n not in st.pretrain.denoise:
                out.append(f"stages.pretrain.datasets[{i}]: {why(n)}: it can only be a denoise head; "
                           f"name it in stages.pretrain.denoise")
        if st.pretrain.datasets and set(st.pretrain.datasets) <= set(st.pretrain.denoise) and st.test.enabled:
            if not st.finetune.enabled:
                out.append("stages.test: every pretrain head is a denoise head, so there is no energy model to test; "
                           "enable finetune or disable test")
            elif st.test.zero_shot:
                out.append("stages.test.zero_shot: every pretrain head is a denoise head (no energy head to re-fit); "
                           "set zero_shot: false")
    if st.finetune.enabled:
        out += [f"stages.finetune.systems[{i}]: {why(n)}: fine-tuning needs labels" for i, n in enumerate(st.finetune.systems)
                if n in free]
    if st.test.enabled and st.test.systems is not None:
        out += [f"stages.test.systems[{i}]: {why(n)}: testing needs labels" for i, n in enumerate(st.test.systems) if n in free]
    if st.clean.enabled and st.clean.datasets is not None:
        out += [f"stages.clean.datasets[{i}]: {why(n)}: cleaning judges labels; leave it out (it is not cleaned)"
                for i, n in enumerate(st.clean.datasets) if n in free]
    if st.distill.enabled and spec.distill_dataset in free:
        out.append(f"stages.distill.dataset: {why(spec.distill_dataset)}: distillation compares with DFT labels")
    return out
