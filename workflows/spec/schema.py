"""The pipeline YAML's schema: frozen pydantic models, unknown keys refused. `PipelineSpec` is
what every later step receives; its validator runs the cross-reference checks (references.py)."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from lamflow.model.schema import Strict

from ..stages import STAGES
from .base import Paths
from .references import reference_problems

# distill: its student's training, after the single-process exploration and labelling)
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")  # usable in Argo names and step keys


DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
    label_free: bool = False  # structures only (CIF, POSCAR, extxyz, ...): a pretrain denoise head (workflows/spec/label_free.py)


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

    # loss_dict.<branch>: noise, noise_ratio, mask_ratio, pref_coord, pref_type (model/training/denoise.py)
    loss: dict[str, Any] = {}
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
