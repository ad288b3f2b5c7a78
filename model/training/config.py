"""Training configs: learning rate, loss, data and the training loop (deepmd-kit input.json
key names and defaults), and reading a training config from YAML/JSON with relative data paths
resolved against its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from lamflow.model.io.yamlio import read_yaml as read
from lamflow.model.nn.config import ModelConfig
from lamflow.model.schema import Strict, parse_config

# Upper bounds on sizes (see nn/config.py): a typo (1e12) is refused before memory or time runs out.


MAX_STEPS = 10**9  # training steps


MAX_BATCH = 10**6  # frames per batch


class LearningRateConfig(Strict):
    type: Literal["exp"] = "exp"
    start_lr: float = Field(1e-3, gt=0)
    stop_lr: float = Field(1e-8, gt=0)
    decay_steps: int = Field(5000, gt=0)
    scale_by_worker: Literal["linear", "sqrt", "none"] = "linear"


class LossConfig(Strict):
    type: Literal["ener"] = "ener"
    start_pref_e: float = Field(0.02, ge=0)
    limit_pref_e: float = Field(1.0, ge=0)
    start_pref_f: float = Field(1000.0, ge=0)
    limit_pref_f: float = Field(1.0, ge=0)
    start_pref_v: float = Field(0.0, ge=0)
    limit_pref_v: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _something_to_fit(self):
        if not any((self.start_pref_e, self.limit_pref_e, self.start_pref_f, self.limit_pref_f, self.start_pref_v,
                    self.limit_pref_v)):
            raise ValueError("every prefactor (start_pref_e/f/v, limit_pref_e/f/v) is 0: the loss fits nothing")
        return self


class DataConfig(Strict):
    systems: Union[str, list[str]]
    batch_size: Union[int, str] = "auto"  # int, "auto" (>= 32 atoms per batch) or "auto:N"
    numb_btch: int = Field(1, gt=0)  # validation batches per display step
    fmt: str = "auto"  # dpdata format; "auto" detects deepmd/npy and deepmd/raw

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v):
        if isinstance(v, int):
            if not 1 <= v <= MAX_BATCH:
                raise ValueError(f"batch_size {v}: give 1..{MAX_BATCH} frames, 'auto' or 'auto:N'")
        elif v != "auto":
            n = v[5:] if v.startswith("auto:") else None
            if n is None or not n.isdigit() or not 1 <= int(n) <= 10**7:
                raise ValueError(f"batch_size {v!r}: give an int, 'auto' or 'auto:N' with N atoms per batch (N >= 1)")
        return v

    @property
    def system_list(self) -> list[str]:
        return [self.systems] if isinstance(self.systems, str) else list(self.systems)


class TrainingLoopConfig(Strict):
    """The training-loop keys shared by single-task, multi-task and distillation-student training."""

    numb_steps: int = Field(1000, ge=0, le=MAX_STEPS)
    seed: int | None = None
    disp_freq: int = Field(100, gt=0)
    save_freq: int = Field(1000, gt=0)
    max_ckpt_keep: int = Field(2, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None  # torch intra-op threads (CPU); None leaves torch's default
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"  # DataLoader workers (auto: min(4, cores - 1) on CPU)
    stat_file: str | None = None  # cached data statistics (deepmd-kit's stat_file); None: OUT/stat_file.pt


class TrainingConfig(TrainingLoopConfig):
    training_data: DataConfig
    validation_data: DataConfig | None = None


class TrainConfig(Strict):
    model: ModelConfig
    learning_rate: LearningRateConfig = LearningRateConfig()
    loss: LossConfig = LossConfig()
    training: TrainingConfig


class DataSettings(DataConfig):
    """A data section before its systems are known (a pipeline stage's: the pipeline gives them)."""

    systems: Union[str, list[str], None] = None


class TrainingSettings(TrainingLoopConfig):
    training_data: DataSettings = DataSettings()
    validation_data: DataSettings | None = None


class TrainSettings(Strict):
    """A training stage's settings, checked before any data is attached: TrainConfig without systems."""

    model: ModelConfig
    learning_rate: LearningRateConfig = LearningRateConfig()
    loss: LossConfig = LossConfig()
    training: TrainingSettings = TrainingSettings()


def read_yaml(path: Path) -> Any:
    """Read YAML (or JSON) with safe_load semantics, duplicate keys refused; errors name the file
    (lamflow.model.io.yamlio, the one YAML reader)."""

    return read(path)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a training config; relative data paths are resolved against the config's folder."""
    path = Path(path)
    raw = read_yaml(path)
    cfg = parse_config(TrainConfig, raw, str(path))
    return resolve_data_paths(cfg, path.parent)


def resolve_data_paths(cfg: TrainConfig, base: Path) -> TrainConfig:
    def fix(dc: DataConfig | None) -> DataConfig | None:
        if dc is None:
            return None
        systems = [str(p if Path(p).is_absolute() else (base / p)) for p in dc.system_list]
        return dc.model_copy(update={"systems": systems})

    training = cfg.training.model_copy(
        update={"training_data": fix(cfg.training.training_data), "validation_data": fix(cfg.training.validation_data)}
    )
    return cfg.model_copy(update={"training": training})


class DenoiseLossConfig(Strict):
    """`loss_dict.<branch>` of a denoise branch: how to corrupt and how to weigh the two terms."""

    type: Literal["denoise"] = "denoise"
    noise: float = Field(0.2, gt=0)  # Angstrom, std of the Gaussian coordinate noise
    noise_ratio: float = Field(0.2, gt=0, le=1)  # fraction of atoms displaced (their neighbours stay clean)
    mask_ratio: float = Field(0.15, ge=0, lt=1)  # fraction of atoms whose type is masked (at least one when > 0)
    pref_coord: float = Field(1.0, ge=0)
    pref_type: float = Field(1.0, ge=0)
    valid_seed: int = 0  # generator seed for the corruption of validation batches
