"""The pipeline spec: one YAML file -> a frozen, validated `PipelineSpec`.

    name: quickstart
    type_map: [H, C, O]                 # optional; default: every element in the datasets
    datasets:                           # name -> paths (folders, files or s3:// URIs), any dpdata format
      ch4: {train: ../examples/data/ch4_pbe/train, valid: ../examples/data/ch4_pbe/valid}
    resources: {image: registry/lamflow:0.1.0-cpu, cpu: 2, memory: 4Gi}   # defaults of every stage
    stages:
      clean:    {datasets: [ch4], config: {...}}
      pretrain: {datasets: [water], config: models/tiny.yaml, training: {numb_steps: 200}}
      finetune: {systems: [ch4], training: {numb_steps: 100}, resources: {gpus: 1, ...}}
      test:     {}                      # default: the fine-tuned systems
      distill:  {teacher: ch4, ...}
      compress: {...}
    engine: {host: https://argo:2746, namespace: lamflow, artifact_repo_key: lamflow-s3}
    debug: {workdir: lamflow-runs, pool_workers: 1}

Only `load_spec` reads raw YAML. It resolves relative paths (against the pipeline file's folder,
then the current directory) and merges `config:` model files, so everything below it receives
typed objects with absolute paths. Problems are `SpecError`s, one line each, naming the file and
the YAML path: `quick.yaml: stages.finetune.systems[2]: unknown dataset 'chon'`.
`check_spec` adds the checks that read data (paths exist, elements in the type map, NaN labels)
and builds every stage's model config, all before any step is submitted.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lamflow.model.errors import LamflowError
from lamflow.model.schema import strip_comments
from lamflow.model.training.config import TrainConfig, read_yaml

STAGES = ("clean", "pretrain", "finetune", "test", "distill", "compress")
PARALLEL_STAGES = ("pretrain", "finetune", "distill")  # stages whose training runs data-parallel (torchrun;
# distill: its student's training, after the single-process exploration and labelling)
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")  # usable in Argo names and step keys
DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class SpecError(LamflowError):
    """The pipeline YAML is wrong: one line per problem, `pipe.yaml: stages.test.systems[1]: ...`."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Paths = Union[str, list[str]]


def as_list(p: Paths | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def is_s3(p: str) -> bool:
    return p.startswith("s3://")


# ----------------------------------------------------------------------------- pieces


class Toleration(Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(Strict):
    """Where and how a stage's pods run on Argo. Debug mode ignores all of it (dflow runs steps as
    local processes). `gpus` become `limits: {nvidia.com/gpu: N}`; only GPU stages may carry
    GPU node selectors and tolerations."""

    image: str | None = None  # pinned: a tag other than latest, or @sha256:
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    cpu: Union[str, float, None] = None  # requests.cpu, e.g. 8 or "500m"
    memory: str | None = None  # requests.memory (and limit), e.g. 32Gi
    gpus: int = Field(0, ge=0)  # per pod (per node with nodes > 1); > 1 on a training stage: torchrun, one rank per GPU
    nodes: int = Field(1, ge=1)  # > 1 (pretrain, finetune): a Kubeflow Trainer TrainJob of `nodes` pods
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    timeout: int | None = Field(None, gt=0)  # seconds
    retries: int = Field(0, ge=0)  # retries of a transient failure (exit code 1)
    envs: dict[str, str] = {}


class Dataset(Strict):
    train: Paths  # folders, files or s3:// URIs
    valid: Paths | None = None
    test: Paths | None = None  # test-only systems (e.g. out-of-distribution)
    fmt: str = "auto"  # dpdata format; auto detects deepmd/npy and deepmd/raw
    label_free: bool = False  # structures only (CIF, POSCAR, extxyz, ...): a pretrain denoise head (workflows/label_free.py)


class StageBase(Strict):
    enabled: bool = True
    resources: Resources = Resources()


class ModelSettings(StageBase):
    """Model and training settings of a training stage: deepmd-kit's `model`, `learning_rate`,
    `loss` and `training` sections, read from a model config file (`config:`) and/or given inline
    (inline keys win, dicts merge). Data paths come from the pipeline, not from here."""

    config: str | None = None  # a model config YAML (e.g. templates/models/*.yaml)
    model: dict[str, Any] = {}
    learning_rate: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    training: dict[str, Any] = {}


class CleanStage(StageBase):
    datasets: list[str] | None = None  # default: every dataset
    config: dict[str, Any] = {}  # lamflow.model.tasks.clean.CleanConfig keys (inline, or a YAML file's path)


class DenoiseSettings(Strict):
    """One denoise head of the pretrain stage: the keys `lamflow train` takes for a denoise branch."""

    loss: dict[str, Any] = {}  # loss_dict.<branch>: noise, noise_ratio, mask_ratio, pref_coord, pref_type (model/training/denoise.py)
    fitting_net: dict[str, Any] = {}  # model_dict.<branch>.fitting_net: neuron, activation_function, precision, seed


class PretrainStage(ModelSettings):
    datasets: list[str] = []  # one head per dataset (multi-task); one dataset: single-task
    denoise: dict[str, DenoiseSettings] = {}  # which of `datasets` are denoise heads (a list of names: default settings)

    @field_validator("denoise", mode="before")
    @classmethod
    def _denoise_list(cls, v):
        return {n: {} for n in v} if isinstance(v, list) and all(isinstance(n, str) for n in v) else v


class FinetuneStage(ModelSettings):
    systems: list[str] = []  # downstream datasets, one fine-tuning step each
    pretrained: str | None = None  # a checkpoint to start from when pretrain is disabled
    branch: str | None = None  # head of a multi-task model to start from (default: chosen per system)
    freeze_descriptor: bool = False


class StabilitySettings(Strict):
    """LAMBench-style NVE stability (lamflow.model.tasks.lambench.stability)."""

    structures: int = Field(3, gt=0)  # start structures drawn from the test frames
    steps: int = Field(200, gt=0)  # NVE steps per run
    timestep: float = Field(0.5, gt=0)  # fs
    temperature: float = Field(300.0, ge=0)  # K, initial velocities
    tolerance: float = Field(5e-4, gt=0)  # eV/atom/ps; LAMBench's threshold


class EfficiencySettings(Strict):
    """LAMBench-style efficiency (lamflow.model.tasks.lambench.efficiency): us/atom on a grown cell."""

    natoms: int = Field(1000, gt=0)  # the test structure replicated to at least this many atoms
    repeats: int = Field(3, gt=0)  # best of this many timed evaluations


class TestStage(StageBase):
    systems: list[str] | None = None  # default: the fine-tuned systems
    zero_shot: bool = True  # also test the pretrained model with only its energy bias re-fitted
    stability: StabilitySettings | None = StabilitySettings()  # null: skip the NVE runs
    efficiency: EfficiencySettings | None = EfficiencySettings()  # null: skip the timing

    def transfer(self) -> dict:
        """The settings lamflow.ops.test.run_test takes as `transfer`."""
        return {k: (None if v is None else v.model_dump()) for k, v in
                (("stability", self.stability), ("efficiency", self.efficiency))}


class DistillStage(StageBase):
    teacher: str | None = None  # a fine-tuned system (default: the first); its model teaches
    dataset: str | None = None  # start structures (train) and DFT reference (valid); default: the teacher's
    config: dict[str, Any] = {}  # lamflow.model.tasks.distill.DistillConfig keys, student model included (or a YAML path)


class CompressStage(StageBase):
    config: dict[str, Any] = {}  # stride, extrapolate, check_frequency, min_nbor_dist (or a YAML path)
    dataset: str | None = None  # frames for the minimal neighbour distance (default: distill's dataset)


class Stages(Strict):
    clean: CleanStage = CleanStage(enabled=False)
    pretrain: PretrainStage = PretrainStage(enabled=False)
    finetune: FinetuneStage = FinetuneStage(enabled=False)
    test: TestStage = TestStage(enabled=False)
    distill: DistillStage = DistillStage(enabled=False)
    compress: CompressStage = CompressStage(enabled=False)

    def enabled(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s).enabled]


class CheckpointStoreSettings(Strict):
    """Where Argo training steps sync their latest checkpoint, so a retried pod (preemption,
    eviction) or `lamflow retry` continues from it (ops/checkpoint_store.py). The endpoint is the
    S3 service as seen from inside the cluster; the keys reach the pods from `credentials_secret`
    (keys accesskey/secretkey, deploy/argo/overlays/*). Debug runs keep local resume folders."""

    enabled: bool = True
    endpoint: str = "minio.lamflow-minio.svc:9000"  # deploy/argo/overlays/minio; s3.<region>.amazonaws.com for AWS
    bucket: str = "lamflow-artifacts"
    secure: bool = False
    prefix: str = "lamflow/checkpoints"
    credentials_secret: str = "lamflow-s3-credentials"


class Engine(Strict):
    """Argo settings (no secrets: the token and S3 keys come from the environment)."""

    host: str | None = None  # LAMFLOW_ARGO_HOST overrides
    namespace: str = "lamflow"  # LAMFLOW_NAMESPACE overrides
    artifact_repo_key: str | None = None  # key in the namespace's artifact-repositories ConfigMap
    service_account: str = "argo"  # the workflow pods' ServiceAccount
    util_image: str | None = None  # image of dflow's helper pods; default: the default stage image
    parallelism: int | None = Field(None, gt=0)  # max pods at once
    pod_gc_strategy: Literal["OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"] | None = None
    checkpoints: CheckpointStoreSettings = CheckpointStoreSettings()
    preemption_retries: int = Field(3, ge=0)  # training steps: pod retries on node preemption/eviction (Argo retryStrategy)
    trainer_runtime: str = "torch-distributed"  # Kubeflow Trainer ClusterTrainingRuntime of multi-node stages


class Debug(Strict):
    """Local runs (`lamflow submit --debug`): dflow's debug mode, one process per step."""

    workdir: str = "lamflow-runs"  # relative to the current directory
    pool_workers: int = Field(1, ge=1, le=256)  # sliced steps (one per system) run this many at once
    threads: int = Field(1, ge=1, le=1024)  # torch threads per step


class PipelineSpec(Strict):
    name: str = "lamflow"
    type_map: list[str] | None = None
    datasets: dict[str, Dataset]
    resources: Resources = Resources()  # defaults of every stage's `resources`
    stages: Stages = Stages()
    engine: Engine = Engine()
    debug: Debug = Debug()

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v):
        if not v:
            raise ValueError("at least one dataset is needed")
        for k in v:
            if not DATASET_RE.match(k):
                raise ValueError(f"dataset name {k!r}: letters, digits, '_', '.', '-' only")
        return v

    @model_validator(mode="after")
    def _references(self):
        problems = []
        if not NAME_RE.match(self.name):
            problems.append(f"name: {self.name!r}: lower-case letters, digits and '-', at most 42 characters "
                            "(it names the Argo workflow)")
        problems += reference_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived views the DAG builder uses
    def stage(self, name: str):
        return getattr(self.stages, name)

    def resources_of(self, stage: str) -> Resources:
        """The stage's resources merged over the top-level defaults (stage keys win)."""
        base = self.resources.model_dump(exclude_unset=True)
        own = self.stage(stage).resources.model_dump(exclude_unset=True)
        return Resources.model_validate({**base, **own})

    @property
    def finetune_systems(self) -> list[str]:
        return list(self.stages.finetune.systems) if self.stages.finetune.enabled else []

    @property
    def test_systems(self) -> list[str]:
        t = self.stages.test
        if not t.enabled:
            return []
        if t.systems is not None:
            return list(t.systems)
        return self.finetune_systems or [d for d in self.stages.pretrain.datasets if not self.datasets[d].label_free]

    @property
    def clean_datasets(self) -> list[str]:
        c = self.stages.clean
        if not c.enabled:
            return []
        return list(c.datasets) if c.datasets is not None else [d for d in self.datasets if not self.datasets[d].label_free]

    @property
    def distill_teacher(self) -> str | None:
        d = self.stages.distill
        if not d.enabled:
            return None
        return d.teacher or (self.finetune_systems[0] if self.finetune_systems else None)

    @property
    def distill_dataset(self) -> str | None:
        d = self.stages.distill
        return (d.dataset or self.distill_teacher) if d.enabled else None

    @property
    def compress_dataset(self) -> str | None:
        c = self.stages.compress
        if not c.enabled:
            return None
        return c.dataset or self.distill_dataset or (self.finetune_systems[0] if self.finetune_systems else None)

    def used_datasets(self) -> list[str]:
        """Datasets some enabled stage reads, in `datasets` order."""
        used = set(self.clean_datasets) | set(self.finetune_systems) | set(self.test_systems)
        if self.stages.pretrain.enabled:
            used |= set(self.stages.pretrain.datasets)
        used |= {d for d in (self.distill_dataset, self.compress_dataset) if d}
        return [d for d in self.datasets if d in used]


def reference_problems(spec: PipelineSpec) -> list[str]:
    """Cross-references between sections: names of datasets, stages that need other stages."""
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
    from .label_free import label_free_problems

    out += label_free_problems(spec)
    return out


def resource_problems(spec: PipelineSpec, stage: str) -> list[str]:
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


# ----------------------------------------------------------------------------- loading


# pydantic puts union members and discriminator tags into error locations; they are not YAML keys
SKIP_LOC = {"str", "list[str]", "list[int]", "int", "float", "se_e2_a", "se_a", "se_atten", "dpa1", "se_atten_v2", "dpa2",
            "dpa3"}


def format_errors(source: str, err: ValidationError, prefix: str = "") -> list[str]:
    """pydantic errors -> one line each, with the YAML path (`stages.test.systems[1]`)."""
    lines = []
    for e in err.errors():
        path = prefix
        for p in e["loc"]:
            if isinstance(p, int):
                path += f"[{p}]"
            elif p in SKIP_LOC or str(p).startswith("function-"):
                continue
            else:
                path += ("." if path else "") + str(p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        for i, part in enumerate(msg.split("\n")):
            # cross-reference errors carry their own paths ("stages.x: ...")
            lines.append(f"{source}: {part}" if (path == prefix and ":" in part and e["type"] == "value_error")
                         else f"{source}: {path or '(top level)'}: {part}")
    return lines


def find_path(p: str, base: Path) -> Path:
    """A relative path: against the pipeline file's folder first, then the current directory."""
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    for root in (base, Path.cwd()):
        if (root / q).exists():
            return (root / q).resolve()
    return (base / q).resolve()


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


MODEL_KEYS = ("model", "learning_rate", "loss", "training")


def merge_model_config(stage: dict, base: Path, source: str, path: str, problems: list[str]) -> dict:
    """Inline model settings over the `config:` file's; returns the stage dict with `config` dropped."""
    cfg_file = stage.get("config")
    if not isinstance(cfg_file, str):
        return stage
    f = find_path(cfg_file, base)
    try:
        raw = strip_comments(read_yaml(f))
    except LamflowError as e:
        problems.append(f"{source}: {path}.config: {e}")
        return {k: v for k, v in stage.items() if k != "config"}
    if not isinstance(raw, dict):
        problems.append(f"{source}: {path}.config: {f}: expected a mapping")
        return {k: v for k, v in stage.items() if k != "config"}
    unknown = [k for k in raw if k not in MODEL_KEYS]
    for k in unknown:
        problems.append(f"{source}: {path}.config: {f}: unknown key {k!r} (a model config holds {', '.join(MODEL_KEYS)})")
    merged = {k: v for k, v in stage.items() if k != "config"}
    for k in MODEL_KEYS:
        if isinstance(raw.get(k), dict):
            inline = stage.get(k, {})
            merged[k] = deep_merge(raw[k], inline if isinstance(inline, dict) else {})
    # data paths of a standalone training config are not the pipeline's
    tr = merged.get("training")
    if isinstance(tr, dict):
        for dk in ("training_data", "validation_data"):
            if isinstance(tr.get(dk), dict):
                tr[dk] = {k: v for k, v in tr[dk].items() if k != "systems"}
    merged["config_file"] = str(f)
    return merged


def read_stage_config(path: str, base: Path, source: str, where: str, problems: list[str]) -> dict:
    """`config: file.yaml` of clean/distill/compress: the file's mapping."""
    f = find_path(path, base)
    try:
        raw = strip_comments(read_yaml(f))
    except LamflowError as e:
        problems.append(f"{source}: {where}.config: {e}")
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{source}: {where}.config: {f}: expected a mapping")
        return {}
    return raw


def resolve_paths(raw: dict, base: Path) -> None:
    """Dataset paths and checkpoint paths become absolute (s3:// URIs stay)."""
    ds = raw.get("datasets")
    if isinstance(ds, dict):
        for d in ds.values():
            if not isinstance(d, dict):
                continue
            for split in ("train", "valid", "test"):
                v = d.get(split)
                if isinstance(v, str):
                    d[split] = v if is_s3(v) else str(find_path(v, base))
                elif isinstance(v, list):
                    d[split] = [x if not isinstance(x, str) or is_s3(x) else str(find_path(x, base)) for x in v]
    ft = (raw.get("stages") or {}).get("finetune") if isinstance(raw.get("stages"), dict) else None
    if isinstance(ft, dict) and isinstance(ft.get("pretrained"), str) and not is_s3(ft["pretrained"]):
        ft["pretrained"] = str(find_path(ft["pretrained"], base))


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """Read, merge and validate a pipeline YAML; raise SpecError listing every problem."""
    path = Path(path)
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    return spec_from_dict(raw, path.resolve().parent, source)


def spec_from_dict(raw: dict, base: Path, source: str = "pipeline") -> PipelineSpec:
    raw = strip_comments(copy.deepcopy(raw))
    problems: list[str] = []
    stages = raw.get("stages")
    if isinstance(stages, dict):
        for name in ("pretrain", "finetune"):
            if isinstance(stages.get(name), dict):
                stages[name] = merge_model_config(stages[name], base, source, f"stages.{name}", problems)
        for name in ("clean", "distill", "compress"):
            if isinstance(stages.get(name), dict) and isinstance(stages[name].get("config"), str):
                stages[name]["config"] = read_stage_config(stages[name]["config"], base, source, f"stages.{name}", problems)
    resolve_paths(raw, base)
    from .label_free import expand_globs

    expand_globs(raw, source, problems)  # label-free datasets may name files by pattern ("structures/*.cif")
    config_files = {}
    if isinstance(stages, dict):
        for name in ("pretrain", "finetune"):
            if isinstance(stages.get(name), dict) and "config_file" in stages[name]:
                config_files[name] = stages[name].pop("config_file")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        problems += format_errors(source, e)
    if problems:
        raise SpecError(problems)
    object.__setattr__(spec, "_source", source)
    object.__setattr__(spec, "_config_files", config_files)
    return spec


def spec_source(spec: PipelineSpec) -> str:
    return getattr(spec, "_source", "pipeline")


# ----------------------------------------------------------------------------- model configs


def model_settings(settings: ModelSettings) -> dict:
    """The `model/learning_rate/loss/training` dicts of a training stage (what its OP receives),
    and `denoise` (head -> {loss, fitting_net}) when the pretrain stage has denoise heads."""
    out = {k: copy.deepcopy(getattr(settings, k)) for k in MODEL_KEYS}
    if getattr(settings, "denoise", None):
        out["denoise"] = {n: d.model_dump() for n, d in settings.denoise.items()}
    return out


def finetune_settings(spec: PipelineSpec) -> dict:
    """Fine-tuning settings; the model section defaults to pretraining's (deepmd-kit checks the
    fine-tune config's descriptor against the pretrained one)."""
    own = model_settings(spec.stages.finetune)
    if spec.stages.pretrain.enabled:
        own["model"] = deep_merge(model_settings(spec.stages.pretrain)["model"], own["model"])
    elif "descriptor" not in own["model"] and spec.stages.finetune.pretrained and not is_s3(spec.stages.finetune.pretrained):
        from lamflow.model.io.checkpoint import read_checkpoint

        p = Path(spec.stages.finetune.pretrained)
        own["model"]["descriptor"] = read_checkpoint(p / "model.ckpt" if p.is_dir() else p)["config"]["descriptor"]
    return own


def zero_shot_branch(spec: PipelineSpec) -> str:
    """The pretrained head whose bias the zero-shot test re-fits: finetune.branch when it names one,
    else the first pretraining dataset of a multi-task model ("" for a single-task model)."""
    b = spec.stages.finetune.branch if spec.stages.finetune.enabled else None
    if b and b != "RANDOM":
        return b
    pre = spec.stages.pretrain
    energy = [d for d in pre.datasets if d not in pre.denoise]  # a denoise head has no energy to re-fit
    return energy[0] if pre.enabled and (len(pre.datasets) > 1 or pre.denoise) and energy else ""


def train_config_dict(settings: ModelSettings, type_map: list[str], train: list[str], valid: list[str] | None,
                      fmt: str = "auto") -> dict:
    from lamflow.ops.common import train_config_dict as build

    return build(model_settings(settings), type_map, train, valid, fmt)


def model_config_problems(source: str, path: str, d: dict) -> list[str]:
    try:
        TrainConfig.model_validate(d)
    except ValidationError as e:
        return [ln for ln in format_errors(source, e, path)
                if ".training_data.systems" not in ln and ".validation_data.systems" not in ln]
    return []


# ----------------------------------------------------------------------------- data checks


def native_elements(path: str, fmt: str = "auto") -> list[str] | None:
    """Elements of deepmd/npy or deepmd/raw systems at or below `path`, from type_map.raw and
    type.raw alone (no torch import: `lamflow render` stays quick). None: another format, or no
    type_map.raw, so lamflow.model.data.systems.elements_in must read it."""
    if fmt not in ("auto", "deepmd/npy", "deepmd/raw"):
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    dirs = [p] if (p / "type.raw").is_file() else sorted({f.parent for f in p.rglob("type.raw")})
    if not dirs:
        return None
    seen: list[str] = []
    for d in dirs:
        if not (d / "type_map.raw").is_file():
            return None
        names = (d / "type_map.raw").read_text().split()
        try:
            types = sorted({int(t) for t in (d / "type.raw").read_text().split()})
        except ValueError:
            return None
        if any(t >= len(names) or t < 0 for t in types):
            return None
        seen += [names[t] for t in types if names[t] not in seen]
    return seen


def resolved_type_map(spec: PipelineSpec, elements: dict[str, list[str]] | None = None) -> list[str]:
    """`type_map:` if given; else every element of the used datasets in order of appearance."""
    if spec.type_map:
        return list(spec.type_map)

    def elements_in(paths, fmt):
        out: list[str] = []
        for p in paths:
            els = native_elements(p, fmt)
            if els is None:
                from lamflow.model.data.systems import elements_in as read

                els = read([p], fmt)
            out += [e for e in els if e not in out]
        return out

    seen: list[str] = []
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        for split in ("train", "valid", "test"):
            paths = [p for p in as_list(getattr(ds, split)) if not is_s3(p)]
            if not paths:
                continue
            els = elements.get(f"{name}.{split}") if elements else None
            if els is None and ds.label_free:
                from .label_free import structure_elements

                els = structure_elements(paths, ds.fmt)
            elif els is None:
                els = elements_in(paths, ds.fmt)
            seen += [e for e in els if e not in seen]
    return seen


def check_spec(spec: PipelineSpec, *, data: bool = True, models: bool = True) -> list[str]:
    """Every problem that can be found before submitting, one line each (empty: all good).
    data=True also reads every local dataset: paths exist, elements are in the type map, no
    NaN/inf labels, at least one frame. models=True also validates the clean/distill settings with
    the model modules' own classes (which import torch; `lamflow render` skips them)."""
    from . import stage_configs

    if data:
        from lamflow.model.data.systems import elements_in, load_systems

    source = spec_source(spec)
    problems: list[str] = []
    elements: dict[str, list[str]] = {}
    used = spec.used_datasets()
    for name in used:
        ds = spec.datasets[name]
        if ds.label_free and data:  # structures only (workflows/label_free.py reads them)
            from .label_free import label_free_elements

            problems += label_free_elements(spec, name, elements)
            continue
        for split in ("train", "valid", "test"):
            for i, p in enumerate(as_list(getattr(ds, split))):
                where = f"datasets.{name}.{split}" + (f"[{i}]" if isinstance(getattr(ds, split), list) else "")
                if is_s3(p):
                    continue
                if not Path(p).exists():
                    problems.append(f"{source}: {where}: no such file or directory: {p}")
                    continue
                if data:
                    try:
                        elements.setdefault(f"{name}.{split}", [])
                        elements[f"{name}.{split}"] += [e for e in elements_in(p, ds.fmt) if e not in elements[f"{name}.{split}"]]
                    except LamflowError as e:
                        problems.append(f"{source}: {where}: {e}")
    if problems:
        return problems
    try:
        type_map = resolved_type_map(spec, elements if data else None) if data or spec.type_map else []
    except LamflowError as e:
        return [f"{source}: datasets: {e}"]
    if data:
        for name in used:
            ds = spec.datasets[name]
            if ds.label_free:
                from .label_free import label_free_systems

                problems += label_free_systems(spec, name, type_map)
                continue
            for split in ("train", "valid", "test"):
                for i, p in enumerate(as_list(getattr(ds, split))):
                    if is_s3(p):
                        continue
                    where = f"datasets.{name}.{split}" + (f"[{i}]" if isinstance(getattr(ds, split), list) else "")
                    try:
                        loaded = load_systems([p], type_map, ds.fmt, lazy=True)
                    except LamflowError as e:
                        problems.append(f"{source}: {where}: {e}")
                        continue
                    problems += stage_configs.sel_problems(spec, name, where, loaded, type_map)
    problems += stage_config_problems(spec, type_map or placeholder_type_map(spec), models=models)
    if data:  # every problem is reported, coverage too
        problems += [line for line in finetune_coverage(spec, elements) if not line.endswith("new, will be added")]
    return problems


def placeholder_type_map(spec: PipelineSpec) -> list[str]:
    """When the data are not read, a stand-in type map: as many elements as a per-element `sel`
    list names (so only the data check, not this stand-in, judges its length)."""
    n = 1
    for st in (spec.stages.pretrain, spec.stages.finetune):
        sel = (st.model.get("descriptor") or {}).get("sel") if isinstance(st.model, dict) else None
        if isinstance(sel, list) and sel:
            n = len(sel)
    return [f"X{i}" for i in range(n)]


def spec_elements(spec: PipelineSpec) -> dict[str, list[str]]:
    """"dataset.split" -> elements of the local paths of every used dataset."""
    from lamflow.model.data.systems import elements_in

    out: dict[str, list[str]] = {}
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        for split in ("train", "valid", "test"):
            paths = [p for p in as_list(getattr(ds, split)) if not is_s3(p)]
            if paths and ds.label_free:
                from .label_free import structure_elements

                out[f"{name}.{split}"] = structure_elements(paths, ds.fmt)
            elif paths:
                out[f"{name}.{split}"] = list(dict.fromkeys(elements_in(paths, ds.fmt)))
    return out


def finetune_coverage(spec: PipelineSpec, elements: dict[str, list[str]]) -> list[str]:
    """Elements of each fine-tuning system that a local `stages.finetune.pretrained` checkpoint lacks:
    "new, will be added" where its descriptor has a type embedding, else a problem naming them.
    `elements`: "dataset.split" -> elements, as check_spec collects them."""
    ft = spec.stages.finetune
    if not ft.enabled or spec.stages.pretrain.enabled or not ft.pretrained or is_s3(ft.pretrained):
        return []
    from lamflow.model.io.checkpoint import read_checkpoint
    from lamflow.model.training.finetune import can_add_elements

    p = Path(ft.pretrained)
    try:
        payload = read_checkpoint(p / "model.ckpt" if p.is_dir() else p)
    except LamflowError as e:
        return [f"{spec_source(spec)}: stages.finetune.pretrained: {e}"]
    tm, dtype = list(payload["config"]["type_map"]), payload["config"]["descriptor"]["type"]
    out = []
    for name in spec.finetune_systems:
        new = [e for split in ("train", "valid") for e in elements.get(f"{name}.{split}", []) if e not in tm]
        new = list(dict.fromkeys(new))
        if not new:
            continue
        where = f"{spec_source(spec)}: stages.finetune.systems: {name}: element(s) {', '.join(new)} not in the type map {tm} of {p}"
        out.append(f"{where}: new, will be added" if can_add_elements(dtype) else
                   f"{where}; its {dtype} descriptor (one net per type pair) cannot add elements")
    return out


def stage_config_problems(spec: PipelineSpec, type_map: list[str], models: bool = True) -> list[str]:
    """Build each training stage's TrainConfig (with placeholder data) and each stage config."""
    source = spec_source(spec)
    out: list[str] = []
    st = spec.stages
    dummy = ["data"]
    from . import stage_configs

    if (st.pretrain.enabled and models and (len(st.pretrain.datasets) > 1 or st.pretrain.denoise)
            and stage_configs.multitask_available()):
        out += stage_configs.multitask_problems(spec, type_map)  # the multi-task trainer's own config model
    elif st.pretrain.enabled:
        out += model_config_problems(source, "stages.pretrain", train_config_dict(st.pretrain, type_map, dummy, dummy))
    if st.finetune.enabled:
        try:
            ft = finetune_settings(spec)
        except LamflowError as e:
            return out + [f"{source}: stages.finetune.pretrained: {e}"]
        from lamflow.ops.common import train_config_dict as build

        out += model_config_problems(source, "stages.finetune", build(ft, type_map, dummy, dummy))
    out += _stage_extra_problems(spec, models)
    for name in st.enabled():
        r = spec.resources_of(name)
        if r.timeout is not None and r.timeout > 30 * 86400:
            out.append(f"{source}: stages.{name}.resources.timeout: {r.timeout} s is more than 30 days")
    return out


def _stage_extra_problems(spec: PipelineSpec, models: bool = True) -> list[str]:
    """Stage configs owned by lamflow.model modules (clean, distill, compress), when present."""
    from . import stage_configs

    return stage_configs.problems(spec, models)


def image_problems(spec: PipelineSpec) -> list[str]:
    """For Argo: every enabled stage has an image, pinned by a tag other than `latest` or a digest."""
    source = spec_source(spec)
    out = []
    for name in spec.stages.enabled():
        img = spec.resources_of(name).image
        if not img:
            out.append(f"{source}: stages.{name}.resources.image: no image (set it here or in the top-level resources)")
        elif not pinned(img):
            out.append(f"{source}: stages.{name}.resources.image: {img!r} is not pinned (use a version tag or @sha256:...)")
    if spec.engine.util_image and not pinned(spec.engine.util_image):
        out.append(f"{source}: engine.util_image: {spec.engine.util_image!r} is not pinned")
    return out


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return bool(re.search(r"@sha256:[0-9a-f]{64}$", image))
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def spec_summary(spec: PipelineSpec) -> dict:
    """A JSON-able description of the resolved spec (stored with each run, for retry)."""
    return {"spec": spec.model_dump(mode="json", exclude_unset=True), "source": spec_source(spec)}


def spec_from_summary(d: dict) -> PipelineSpec:
    spec = PipelineSpec.model_validate(d["spec"])
    object.__setattr__(spec, "_source", d.get("source", "pipeline"))
    return spec
