"""lamflow.model.training: the trainer (single- and multi-task, DDP), loss, denoise head,
statistics, fine-tuning and a pretrained model put to a new use (pretrained.py)."""

from lamflow.model import lazy_exports

# public name -> the submodule that defines it; imported on first use, so that importing one light
# submodule (a config, for the CLI's validation) does not import torch and every other module
_EXPORTS = {
    "TrainConfig": "config",
    "TrainingConfig": "config",
    "DataConfig": "config",
    "LossConfig": "config",
    "LearningRateConfig": "config",
    "load_train_config": "config",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "train": "trainer",
    "build_energy_model": "trainer",
    "change_type_map": "finetune",
    "read_model": "pretrained",
    "energy_model": "pretrained",
    "load_pretrained": "pretrained",
    "retype": "pretrained",
    "change_bias": "pretrained",
    "zero_shot": "pretrained",
    "refit_bias": "pretrained",
    "train_multitask": "multitask",
    "load_multitask_config": "multitask_config",
    "parse_multitask_config": "multitask_config",
    "multitask_layout": "multitask_config",
    "MultiTaskTrainConfig": "multitask_config",
    "load_branch": "pretrained",
    "collect": "metrics",
    "dataset_metrics": "metrics",
    "predict_systems": "metrics",
    "fit_statistics": "stats",
    "StatFile": "stats",
    "EnergyLoss": "loss",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
