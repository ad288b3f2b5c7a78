"""Typed, validated model configs: the fitting net and the model (the descriptor configs are in
nn/descriptor_config.py), and the descriptor tags. Key names and defaults follow deepmd-kit's
input.json (argcheck), so the `model` section of a deepmd-kit input can be reused; the
`learning_rate`, `loss` and `training` sections are in training/config.py.

Validated once at the edge (`load_train_config`); inner code receives these frozen objects.
Where we deviate from deepmd-kit's argcheck default we say so next to the field.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import Field, field_validator, model_validator

from lamflow.model.nn.descriptor_config import (
    Activation,
    DPA2Config,
    DPA3Config,
    Precision,
    SeAttenConfig,
    SeE2AConfig,
    _check_widths,
    dtype_name,
)
from lamflow.model.schema import Strict


class FittingConfig(Strict):
    """Energy fitting net; defaults as deepmd-kit argcheck."""

    type: Literal["ener"] = "ener"
    neuron: list[int] = [120, 120, 120]
    resnet_dt: bool = True
    activation_function: Activation = "tanh"
    precision: Precision = "default"
    numb_fparam: int = 0
    numb_aparam: int = 0
    trainable: bool = True
    rcond: float | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.numb_fparam or self.numb_aparam:
            raise ValueError("frame/atomic parameters (numb_fparam, numb_aparam) are not supported by lamflow")
        _check_widths(self.neuron, "neuron")
        return self


DescriptorConfig = Annotated[Union[SeE2AConfig, SeAttenConfig, DPA2Config, DPA3Config], Field(discriminator="type")]

# The descriptor tags, stated once: each config class's `type` Literal. Everyone reads these (validation
# messages, deepmd-kit import and export, the data checks, inspect); the descriptor classes register
# themselves under the same tags (nn/descriptor/base.py: Descriptor).
DESCRIPTOR_CONFIGS: dict[str, type[Strict]] = {
    tag: cls for cls in get_args(get_args(DescriptorConfig)[0]) for tag in get_args(cls.model_fields["type"].annotation)
}
DESCRIPTOR_TAGS: tuple[str, ...] = tuple(DESCRIPTOR_CONFIGS)


def descriptor_tags(cls: type[Strict]) -> tuple[str, ...]:
    """The `type` tags of one descriptor config class (e.g. SeE2AConfig -> ("se_e2_a", "se_a"))."""
    return tuple(get_args(cls.model_fields["type"].annotation))


class ModelConfig(Strict):
    type_map: list[str]
    descriptor: DescriptorConfig
    fitting_net: FittingConfig = FittingConfig()
    data_stat_nbatch: int = Field(10, gt=0)
    data_stat_protect: float = 1e-2

    @field_validator("type_map")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v) or not v:
            raise ValueError(f"type_map must be a non-empty list of distinct elements, got {v}")
        return v

    @model_validator(mode="after")
    def _sel_per_type(self):
        d = self.descriptor
        if isinstance(d, SeE2AConfig) and isinstance(d.sel, list) and len(d.sel) != len(self.type_map):
            raise ValueError(f"descriptor.sel: {len(d.sel)} entries {d.sel} for {len(self.type_map)} elements in "
                             f"type_map {self.type_map} (se_e2_a needs one neighbour count per element)")
        return self

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.descriptor.precision)


MASK = "MASK"  # the input-only pseudo-type appended to the type map when types are masked


class DenoiseNetConfig(Strict):
    """The denoise head of a `task: denoise` branch (its `fitting_net` section)."""

    neuron: list[int] = [32, 32]  # hidden widths of MLP_w (pair weights) and MLP_t (type logits)
    activation_function: Activation = "tanh"
    precision: Literal["default", "float64", "float32"] = "default"
    seed: int | None = None
