"""What the DAG hands each training stage: its model/learning_rate/loss/training settings (fine-tuning's
model section defaults to pretraining's, or the pretrained checkpoint's descriptor)."""

from __future__ import annotations

import copy
from pathlib import Path

from lamflow.model.schema import MODEL_KEYS, deep_merge
from lamflow.ops.artifacts import model_file

from .base import is_s3
from .schema import ModelSettings, PipelineSpec


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
        own["model"]["descriptor"] = read_checkpoint(model_file(p))["config"]["descriptor"]
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
