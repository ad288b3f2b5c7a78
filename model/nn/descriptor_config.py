"""Descriptor configs (se_e2_a, se_atten, dpa2 with repinit/repformer, dpa3 with repflow) and the
checks they share; key names and defaults follow deepmd-kit's argcheck, deviations said next to
the field. The model config that holds one of them: nn/config.py."""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import AliasChoices, Field, model_validator

from lamflow.model.schema import Strict

# Upper bounds on sizes: far above any real model (deepmd-kit examples use sel <= ~500 per type,
# widths <= 1024), low enough that a typo (1e12) is refused before memory or time runs out.


Precision = Literal["default", "float64", "float32"]

MAX_SEL = 4096  # neighbours per type (or in total for mixed-type descriptors)


MAX_WIDTH = 65536  # neurons in one layer


Activation = Literal["tanh", "gelu", "gelu_tf", "relu", "silu", "softplus", "sigmoid", "linear", "none"]


def dtype_name(precision: str) -> str:
    """deepmd-kit's "default" precision is float64."""
    return "float32" if precision == "float32" else "float64"


class SeE2AConfig(Strict):
    """se_e2_a (DeepPot-SE); defaults as deepmd-kit argcheck."""
    mixed_types: ClassVar[bool] = False  # one fitting net per atom type, typed neighbour lists

    type: Literal["se_e2_a", "se_a"] = "se_e2_a"
    rcut: float = Field(6.0, gt=0)  # Angstrom
    rcut_smth: float = Field(0.5, ge=0)  # Angstrom, < rcut
    sel: Union[list[int], str] = "auto"  # max neighbours per type, or "auto" / "auto:1.1"
    neuron: list[int] = [10, 20, 40]  # embedding net widths, M1 = neuron[-1]
    axis_neuron: int = Field(4, gt=0)  # M2
    type_one_side: bool = False  # True: one embedding net per neighbour type
    resnet_dt: bool = False
    activation_function: Activation = "tanh"
    precision: Precision = "default"
    set_davg_zero: bool = False
    env_protection: float = 0.0
    exclude_types: list[list[int]] = []
    trainable: bool = True
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self):
        _check_common(self)
        if self.axis_neuron > self.neuron[-1]:
            raise ValueError(f"axis_neuron {self.axis_neuron} > neuron[-1] {self.neuron[-1]}")
        return self


class SeAttenConfig(Strict):
    """se_atten (DPA-1) and se_atten_v2; defaults as deepmd-kit argcheck, except
    `smooth_type_embedding`, which defaults to True here (deepmd-kit: False) so that the
    energy is continuous at rcut, as our physics contract requires. An input that sets it
    to False explicitly gets deepmd-kit's masked (non-smooth) attention."""
    mixed_types: ClassVar[bool] = True  # one shared fitting net, one mixed neighbour list

    type: Literal["se_atten", "dpa1", "se_atten_v2"] = "se_atten"
    rcut: float = Field(6.0, gt=0)
    rcut_smth: float = Field(0.5, ge=0)
    sel: Union[int, list[int], str] = "auto"  # total neighbours (mixed types); a list is summed
    neuron: list[int] = [10, 20, 40]
    axis_neuron: int = Field(4, gt=0)
    tebd_dim: int = Field(8, gt=0)
    tebd_input_mode: Literal["concat", "strip"] = "concat"
    resnet_dt: bool = False
    type_one_side: bool = False
    attn: int = Field(128, gt=0)  # hidden width of the gated attention
    attn_layer: int = Field(2, ge=0)
    attn_dotr: bool = True
    attn_mask: bool = False
    activation_function: Activation = "tanh"
    precision: Precision = "default"
    scaling_factor: float = 1.0
    normalize: bool = True
    temperature: float | None = None
    concat_output_tebd: bool = True
    set_davg_zero: bool = True
    smooth_type_embedding: bool = True  # deviation, see class docstring
    exclude_types: list[list[int]] = []
    env_protection: float = 0.0
    trainable: bool = True
    trainable_ln: bool = True
    ln_eps: float = 1e-5
    use_econf_tebd: bool = False
    use_tebd_bias: bool = False
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self):
        _check_common(self)
        if self.use_econf_tebd:
            raise ValueError("use_econf_tebd is not supported by lamflow")
        return self

    @property
    def strip(self) -> bool:
        return self.type == "se_atten_v2" or self.tebd_input_mode == "strip"


def _check_auto(value, key: str) -> None:
    if isinstance(value, str) and not (value == "auto" or value.startswith("auto:")):
        raise ValueError(f"{key} must be an int, 'auto' or 'auto:RATIO', got {value!r}")


class RepinitConfig(Strict):
    """DPA-2 `repinit` block (se_atten without attention, optionally with the se_t_tebd three-body
    block); defaults as deepmd-kit argcheck, except that `nsel` defaults to "auto" (deepmd-kit: required)."""

    rcut: float = Field(gt=0)  # Angstrom
    rcut_smth: float = Field(ge=0)  # Angstrom, < rcut
    nsel: Union[int, str] = "auto"  # total neighbours (mixed list), or "auto" / "auto:1.1"
    neuron: list[int] = [25, 50, 100]
    axis_neuron: int = Field(16, gt=0)
    tebd_dim: int = Field(8, gt=0)
    tebd_input_mode: Literal["concat", "strip"] = "concat"
    set_davg_zero: bool = True
    activation_function: Activation = "tanh"
    resnet_dt: bool = False
    type_one_side: bool = False
    use_three_body: bool = False
    three_body_neuron: list[int] = [2, 4, 8]
    three_body_sel: Union[int, str] = 40
    three_body_rcut: float = Field(4.0, gt=0)
    three_body_rcut_smth: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.rcut_smth >= self.rcut:
            raise ValueError(f"rcut_smth {self.rcut_smth} must be < rcut {self.rcut}")
        if not self.neuron or any(n <= 0 for n in self.neuron):
            raise ValueError("neuron must be a non-empty list of positive widths")
        if self.axis_neuron > self.neuron[-1]:
            raise ValueError(f"axis_neuron {self.axis_neuron} > neuron[-1] {self.neuron[-1]}")
        _check_auto(self.nsel, "nsel")
        _check_auto(self.three_body_sel, "three_body_sel")
        _check_sel(self.nsel, "nsel")
        _check_sel(self.three_body_sel, "three_body_sel")
        _check_widths(self.neuron, "neuron")
        if self.use_three_body:
            if self.three_body_rcut_smth >= self.three_body_rcut:
                raise ValueError(f"three_body_rcut_smth {self.three_body_rcut_smth} must be < three_body_rcut {self.three_body_rcut}")
            if not self.three_body_neuron or any(n <= 0 for n in self.three_body_neuron):
                raise ValueError("three_body_neuron must be a non-empty list of positive widths")
        return self


class RepformerConfig(Strict):
    """DPA-2 `repformer` block; defaults as deepmd-kit argcheck, except that `nsel` defaults to
    "auto" (deepmd-kit: required)."""

    rcut: float = Field(gt=0)
    rcut_smth: float = Field(ge=0)
    nsel: Union[int, str] = "auto"
    nlayers: int = Field(3, ge=1)
    g1_dim: int = Field(128, gt=0)  # single-atom channel
    g2_dim: int = Field(16, gt=0)  # pair channel
    axis_neuron: int = Field(4, gt=0)
    direct_dist: bool = False
    update_g1_has_conv: bool = True
    update_g1_has_drrd: bool = True
    update_g1_has_grrg: bool = True
    update_g1_has_attn: bool = True
    update_g2_has_g1g1: bool = True
    update_g2_has_attn: bool = True
    update_h2: bool = False
    attn1_hidden: int = Field(64, gt=0)
    attn1_nhead: int = Field(4, gt=0)
    attn2_hidden: int = Field(16, gt=0)
    attn2_nhead: int = Field(4, gt=0)
    attn2_has_gate: bool = False
    activation_function: Activation = "tanh"
    update_style: Literal["res_avg", "res_incr", "res_residual"] = "res_avg"
    update_residual: float = 0.001
    update_residual_init: Literal["norm", "const"] = "norm"
    set_davg_zero: bool = True
    trainable_ln: bool = True
    ln_eps: float | None = None  # None = 1e-5
    use_sqrt_nnei: bool = True
    g1_out_conv: bool = True
    g1_out_mlp: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.rcut_smth >= self.rcut:
            raise ValueError(f"rcut_smth {self.rcut_smth} must be < rcut {self.rcut}")
        _check_auto(self.nsel, "nsel")
        _check_sel(self.nsel, "nsel")
        for k in ("g1_dim", "g2_dim", "attn1_hidden", "attn2_hidden"):
            if getattr(self, k) > MAX_WIDTH:
                raise ValueError(f"{k}: {getattr(self, k)} is more than {MAX_WIDTH}")
        if self.update_g1_has_grrg and self.axis_neuron > self.g2_dim:
            raise ValueError(f"axis_neuron {self.axis_neuron} > g2_dim {self.g2_dim} (used by update_g1_has_grrg)")
        if self.update_g1_has_drrd and self.axis_neuron > self.g1_dim:
            raise ValueError(f"axis_neuron {self.axis_neuron} > g1_dim {self.g1_dim} (used by update_g1_has_drrd)")
        return self


class DPA2Config(Strict):
    """DPA-2 (`type: dpa2`); keys and defaults as deepmd-kit argcheck. Not supported (rejected):
    exclude_types, use_econf_tebd."""
    mixed_types: ClassVar[bool] = True  # one shared fitting net

    type: Literal["dpa2"] = "dpa2"
    repinit: RepinitConfig
    repformer: RepformerConfig
    concat_output_tebd: bool = True
    precision: Precision = "default"
    smooth: bool = True
    exclude_types: list[list[int]] = []
    env_protection: float = 0.0
    trainable: bool = True
    seed: int | None = None
    add_tebd_to_repinit_out: bool = Field(
        False, validation_alias=AliasChoices("add_tebd_to_repinit_out", "repformer_add_type_ebd_to_seq"))
    use_econf_tebd: bool = False
    use_tebd_bias: bool = False
    type_map: list[str] | None = None  # informational (deepmd-kit passes the model's); checked against it

    @model_validator(mode="after")
    def _check(self):
        if self.exclude_types:
            raise ValueError("exclude_types is not supported by lamflow")
        if self.use_econf_tebd:
            raise ValueError("use_econf_tebd is not supported by lamflow")
        return self

    @property
    def rcut(self) -> float:
        """The largest cutoff: ghost atoms and smoothness checks use it."""
        three = self.repinit.three_body_rcut if self.repinit.use_three_body else 0.0
        return max(self.repinit.rcut, self.repformer.rcut, three)


def _check_dpa3_activation(name: str) -> str:
    """The activations of network.py, plus deepmd-kit's `silut[:T]` / `custom_silu[:T]` (T = 3 by default)."""
    base, _, threshold = name.partition(":")
    if base in ("silut", "custom_silu"):
        try:
            float(threshold or 3.0)
        except ValueError:
            raise ValueError(f"activation_function {name!r}: the threshold after ':' must be a number") from None
        return name
    if name not in Activation.__args__:
        raise ValueError(f"activation_function {name!r} is not one of {list(Activation.__args__) + ['silut:T', 'custom_silu:T']}")
    return name


class RepFlowConfig(Strict):
    """DPA-3 `repflow` block; keys and defaults as deepmd-kit 3.2.0 argcheck (dpa3_repflow_args),
    except that e_sel / a_sel default to "auto" (deepmd-kit: required)."""

    n_dim: int = Field(128, gt=0)  # node channel
    e_dim: int = Field(64, gt=0)  # edge channel
    a_dim: int = Field(64, gt=0)  # angle channel
    nlayers: int = Field(6, ge=1)
    e_rcut: float = Field(gt=0)  # Angstrom
    e_rcut_smth: float = Field(ge=0)  # Angstrom, < e_rcut
    e_sel: Union[int, str] = "auto"  # edge slots (mixed list), or "auto" / "auto:1.1"
    a_rcut: float = Field(gt=0)  # Angstrom, <= e_rcut
    a_rcut_smth: float = Field(ge=0)  # Angstrom, < a_rcut
    a_sel: Union[int, str] = "auto"  # angle slots: the first a_sel edge slots within a_rcut
    a_compress_rate: int = Field(0, ge=0)
    a_compress_e_rate: int = Field(1, gt=0)
    a_compress_use_split: bool = False
    n_multi_edge_message: int = Field(1, ge=1)
    axis_neuron: int = Field(4, gt=0)
    fix_stat_std: float = Field(0.3, ge=0)  # constant std of the env matrix; 0: from data
    skip_stat: bool = False  # deprecated in deepmd-kit: forces fix_stat_std 0.3
    update_angle: bool = True
    update_style: Literal["res_avg", "res_incr", "res_residual"] = "res_residual"
    update_residual: float = 0.1
    update_residual_init: Literal["norm", "const"] = "const"
    optim_update: bool = True  # the same function either way (split matrices); kept for deepmd-kit inputs
    smooth_edge_update: bool = False
    edge_init_use_dist: bool = Field(False, validation_alias=AliasChoices("edge_init_use_dist", "edge_use_dist"))
    use_exp_switch: bool = Field(False, validation_alias=AliasChoices("use_exp_switch", "use_env_envelope"))
    use_dynamic_sel: bool = False  # computed densely: only the normalisation uses e_sel / sel_reduce_factor
    sel_reduce_factor: float = Field(10.0, gt=0)
    sequential_update: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.e_rcut_smth >= self.e_rcut:
            raise ValueError(f"e_rcut_smth {self.e_rcut_smth} must be < e_rcut {self.e_rcut}")
        if self.a_rcut_smth >= self.a_rcut:
            raise ValueError(f"a_rcut_smth {self.a_rcut_smth} must be < a_rcut {self.a_rcut}")
        if self.a_rcut > self.e_rcut:
            raise ValueError(f"a_rcut {self.a_rcut} must be <= e_rcut {self.e_rcut}")
        _check_auto(self.e_sel, "e_sel")
        _check_auto(self.a_sel, "a_sel")
        if isinstance(self.e_sel, int) and isinstance(self.a_sel, int) and self.a_sel > self.e_sel:
            raise ValueError(f"a_sel {self.a_sel} must be <= e_sel {self.e_sel}")
        if self.axis_neuron > min(self.n_dim, self.e_dim):
            raise ValueError(f"axis_neuron {self.axis_neuron} > min(n_dim, e_dim) = {min(self.n_dim, self.e_dim)}")
        if self.a_compress_rate and (self.a_dim * self.a_compress_e_rate) % (2 * self.a_compress_rate):
            raise ValueError(f"a_dim * a_compress_e_rate = {self.a_dim * self.a_compress_e_rate} must be divisible by "
                             f"2 * a_compress_rate = {2 * self.a_compress_rate}")
        if self.a_compress_rate and self.a_compress_use_split:
            n_a = self.a_dim // self.a_compress_rate
            e_a = self.a_dim // (2 * self.a_compress_rate) * self.a_compress_e_rate
            if n_a > self.n_dim or e_a > self.e_dim:
                raise ValueError(f"a_compress_use_split keeps the first {n_a} node and {e_a} edge columns, "
                                 f"more than n_dim {self.n_dim} or e_dim {self.e_dim}")
        if self.use_dynamic_sel and not self.smooth_edge_update:
            raise ValueError("use_dynamic_sel needs smooth_edge_update: true (as in deepmd-kit)")
        if self.sequential_update and (self.update_style != "res_residual" or not self.update_angle):
            raise ValueError("sequential_update needs update_style: res_residual and update_angle: true (as in deepmd-kit)")
        return self

    @property
    def std(self) -> float:
        """The constant env-matrix std, 0 when it comes from data."""
        return 0.3 if self.skip_stat else self.fix_stat_std


class DPA3Config(Strict):
    """DPA-3 (`type: dpa3`); keys and defaults as deepmd-kit 3.2.0 argcheck (descrpt_dpa3_args).
    Not supported (rejected): exclude_types, use_econf_tebd, add_chg_spin_ebd (needs a per-frame
    charge/spin input). use_loc_mapping is accepted either way (the same function)."""
    mixed_types: ClassVar[bool] = True  # one shared fitting net

    type: Literal["dpa3"] = "dpa3"
    repflow: RepFlowConfig
    concat_output_tebd: bool = False
    activation_function: str = "silu"
    precision: Precision = "default"
    exclude_types: list[list[int]] = []
    env_protection: float = 0.0
    trainable: bool = True
    seed: int | None = None
    use_econf_tebd: bool = False
    use_tebd_bias: bool = False
    use_loc_mapping: bool = True
    add_chg_spin_ebd: bool = False
    default_chg_spin: list[float] | None = None
    type_map: list[str] | None = None  # informational (deepmd-kit passes the model's); checked against it

    @model_validator(mode="after")
    def _check(self):
        _check_dpa3_activation(self.activation_function)
        for key in ("exclude_types", "use_econf_tebd", "add_chg_spin_ebd"):
            if getattr(self, key):
                raise ValueError(f"{key} is not supported by lamflow's dpa3")
        return self

    @property
    def rcut(self) -> float:
        """The edge cutoff (the angle list is cut from the edge list)."""
        return self.repflow.e_rcut


def _check_common(cfg) -> None:
    if cfg.rcut_smth >= cfg.rcut:
        raise ValueError(f"rcut_smth {cfg.rcut_smth} must be < rcut {cfg.rcut}")
    if not cfg.neuron or any(n <= 0 for n in cfg.neuron):
        raise ValueError("neuron must be a non-empty list of positive widths")
    if cfg.exclude_types:
        raise ValueError("exclude_types is not supported by lamflow")
    if isinstance(cfg.sel, str) and not (cfg.sel == "auto" or cfg.sel.startswith("auto:")):
        raise ValueError(f"sel must be a list of ints, an int, 'auto' or 'auto:RATIO', got {cfg.sel!r}")
    _check_sel(cfg.sel, "sel")
    _check_widths(cfg.neuron, "neuron")


def _check_sel(sel, key: str) -> None:
    """Neighbour counts: non-negative ints up to MAX_SEL each; "auto:RATIO" with a positive ratio."""
    if isinstance(sel, str):
        if sel.startswith("auto:"):
            try:
                ratio = float(sel[5:])
            except ValueError:
                raise ValueError(f"{key}: {sel!r}: the ratio after 'auto:' must be a number") from None
            if not 0 < ratio <= 100:
                raise ValueError(f"{key}: {sel!r}: the ratio must be in (0, 100]")
        return
    for i, n in enumerate([sel] if isinstance(sel, int) else sel):
        if n < 0 or n > MAX_SEL:
            where = key if isinstance(sel, int) else f"{key}[{i}]"
            raise ValueError(f"{where}: {n} neighbours is outside 0..{MAX_SEL}")
    if not isinstance(sel, int) and sum(sel) == 0:
        raise ValueError(f"{key}: all entries are 0 (no neighbours at all)")


def _check_widths(neuron, key: str) -> None:
    for i, n in enumerate(neuron):
        if n <= 0 or n > MAX_WIDTH:
            raise ValueError(f"{key}[{i}]: a layer of {n} neurons (give 1..{MAX_WIDTH})")
