"""deepmd-kit `model_params` -> our typed ModelConfig (step 1 of io/deepmd_import.py): every option
that changes the predictions must be one we implement with the same value, or the import fails
naming it; options that only steer training (seeds, statistics sample sizes, ...) are dropped."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from lamflow.model.errors import CheckpointError
from lamflow.model.nn.config import DESCRIPTOR_CONFIGS, DESCRIPTOR_TAGS, ModelConfig
from lamflow.model.nn.descriptor_config import DPA2Config, DPA3Config, SeAttenConfig, SeE2AConfig
from lamflow.model.schema import format_validation_error

_MISSING = object()


ACTIVATIONS = {"tanh", "gelu", "gelu_tf", "relu", "silu", "softplus", "sigmoid", "linear", "none"}


class _Options:
    """Consumes one deepmd-kit option dict; `finish` fails on any option nobody consumed."""

    def __init__(self, raw: dict, where: str, source: str):
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.where, self.source = dict(raw), where, source

    def error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.where}: {msg}")

    def take(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.raw:
            return self.raw.pop(key)
        if default is _MISSING:
            raise self.error(f"missing option {key!r}")
        return default

    def require(self, key: str, ok: Callable[[Any], bool], default: Any = None, why: str = "is not supported by lamflow"):
        value = self.take(key, default)
        if not ok(value):
            raise self.error(f"{key}={value!r} {why}")
        return value

    def ignore(self, *keys: str) -> None:
        """Options that only steer training or statistics, never a prediction of the trained model."""
        for k in keys:
            self.raw.pop(k, None)

    def finish(self) -> None:
        if self.raw:
            key = sorted(self.raw)[0]
            raise self.error(f"option {key}={self.raw[key]!r} is not supported by lamflow")


def _empty(v) -> bool:
    return v is None or v == [] or v == ()


def _activation(o: _Options, key: str = "activation_function", default: str = "tanh") -> str:
    name = str(o.take(key, default)).lower()
    if name not in ACTIVATIONS:
        raise o.error(f"{key}={name!r} is not supported by lamflow (supported: {sorted(ACTIVATIONS)})")
    return name


def _precision(o: _Options) -> str:
    p = o.take("precision", "default")
    if p not in ("default", "float64", "float32"):
        raise o.error(f"precision={p!r} is not supported by lamflow (float64, float32)")
    return p


def _se_e2_a(o: _Options, dtype: str) -> dict:
    cfg = {
        "type": "se_e2_a",
        "rcut": o.take("rcut"), "rcut_smth": o.take("rcut_smth"), "sel": o.take("sel"),
        "neuron": o.take("neuron", [10, 20, 40]), "axis_neuron": o.take("axis_neuron", 4),
        "type_one_side": o.take("type_one_side", False), "resnet_dt": o.take("resnet_dt", False),
        "activation_function": _activation(o), "precision": _precision(o),
        "set_davg_zero": o.take("set_davg_zero", False), "env_protection": o.take("env_protection", 0.0),
        "trainable": bool(o.take("trainable", True)),
    }
    o.require("exclude_types", _empty, [])
    o.require("spin", _empty)
    o.ignore("seed")
    return cfg


def _se_atten(o: _Options, dtype: str) -> dict:
    v2 = dtype == "se_atten_v2"
    mode = "strip" if v2 else o.take("tebd_input_mode", "concat")
    stripped = o.take("stripped_type_embedding", None)  # deprecated alias, wins when set
    if stripped is not None:
        mode = "strip" if stripped else "concat"
    smooth = True if v2 else o.take("smooth_type_embedding", False)
    ln_eps = o.take("ln_eps", None)
    sel = o.take("sel")  # one mixed list: a per-type list means its sum
    cfg = {
        "type": "se_atten_v2" if mode == "strip" and v2 else "se_atten",
        "rcut": o.take("rcut"), "rcut_smth": o.take("rcut_smth"), "sel": sum(sel) if isinstance(sel, list) else sel,
        "neuron": o.take("neuron", [25, 50, 100]), "axis_neuron": o.take("axis_neuron", 16),
        "tebd_dim": o.take("tebd_dim", 8), "tebd_input_mode": mode,
        "resnet_dt": o.take("resnet_dt", False), "type_one_side": o.take("type_one_side", False),
        "attn": o.take("attn", 128), "attn_layer": o.take("attn_layer", 2), "attn_dotr": o.take("attn_dotr", True),
        "activation_function": _activation(o), "precision": _precision(o),
        "scaling_factor": float(o.take("scaling_factor", 1.0)), "normalize": o.take("normalize", True),
        "temperature": o.take("temperature", None), "concat_output_tebd": o.take("concat_output_tebd", True),
        "set_davg_zero": o.take("set_davg_zero", True), "smooth_type_embedding": smooth,
        "env_protection": o.take("env_protection", 0.0), "trainable": bool(o.take("trainable", True)),
        "trainable_ln": o.take("trainable_ln", True), "ln_eps": 1e-5 if ln_eps is None else ln_eps,
        "use_tebd_bias": o.take("use_tebd_bias", False),
    }
    # deepmd-kit's PyTorch DPA-1 accepts attn_mask but never applies it (`del attn_mask`): the
    # checkpoint's predictions are those of an unmasked attention, our attn_mask=False
    o.ignore("attn_mask")
    o.require("exclude_types", _empty, [])
    o.require("use_econf_tebd", lambda v: not v, False)
    o.require("lmax", lambda v: v == 1, 1, "(higher-order moments) is not supported by lamflow")
    o.require("spin", _empty)
    o.ignore("seed", "type_map")
    return cfg


def _dpa2(o: _Options, dtype: str) -> dict:
    """DPA2Config spells every option as deepmd-kit does: the blocks are checked key by key there
    (an unknown or unsupported key is a validation error naming it)."""
    blocks = {}
    for name in ("repinit", "repformer"):
        b = dict(o.take(name))
        if "activation_function" in b:
            b["activation_function"] = _activation(_Options(b, f"{o.where}.{name}", o.source))
        blocks[name] = b
    cfg = {"type": "dpa2", **blocks, "precision": _precision(o)}
    for key in ("concat_output_tebd", "smooth", "env_protection", "add_tebd_to_repinit_out", "use_tebd_bias",
                "exclude_types", "use_econf_tebd"):
        if key in o.raw:
            cfg[key] = o.take(key)
    if "repformer_add_type_ebd_to_seq" in o.raw:  # deepmd-kit's older name
        cfg["add_tebd_to_repinit_out"] = o.take("repformer_add_type_ebd_to_seq")
    cfg["trainable"] = bool(o.take("trainable", True))
    o.require("spin", _empty)
    o.ignore("seed", "type_map")
    return cfg


def _dpa3(o: _Options, dtype: str) -> dict:
    """DPA3Config spells every option as deepmd-kit does (repflow key by key, unsupported values
    refused by its validators, naming the key)."""
    cfg = {"type": "dpa3", "repflow": dict(o.take("repflow")), "precision": _precision(o),
           "activation_function": str(o.take("activation_function", "silu"))}
    for key in ("concat_output_tebd", "env_protection", "use_tebd_bias", "exclude_types", "use_econf_tebd",
                "use_loc_mapping", "add_chg_spin_ebd", "default_chg_spin"):
        if key in o.raw:
            cfg[key] = o.take(key)
    cfg["trainable"] = bool(o.take("trainable", True))
    o.require("spin", _empty)
    o.ignore("seed", "type_map")
    return cfg


def _fitting(o: _Options) -> dict:
    o.require("type", lambda v: v == "ener", "ener", "(fitting type) is not supported by lamflow (only 'ener')")
    trainable = o.take("trainable", True)
    cfg = {
        "neuron": o.take("neuron", [120, 120, 120]), "resnet_dt": o.take("resnet_dt", True),
        "activation_function": _activation(o), "precision": _precision(o),
        "trainable": all(trainable) if isinstance(trainable, list) else bool(trainable),
        "rcond": o.take("rcond", None),
    }
    o.require("numb_fparam", lambda v: not v, 0)
    o.require("numb_aparam", lambda v: not v, 0)
    o.require("default_fparam", _empty)
    o.ignore("dim_case_embd")  # the branch's constant one-hot input: folded into the first layer's bias (fold_case_embd)
    o.require("atom_ener", lambda v: v is None or all(x is None for x in v), [])
    o.require("layer_name", _empty)
    o.ignore("seed", "use_aparam_as_mask")  # the mask option means nothing without aparam
    return cfg


# descriptor config class -> its translator; a deepmd-kit tag finds its class in DESCRIPTOR_CONFIGS
DESCRIPTORS: dict[type, Callable[[_Options, str], dict]] = {
    SeE2AConfig: _se_e2_a, SeAttenConfig: _se_atten, DPA2Config: _dpa2, DPA3Config: _dpa3,
}


def model_config(params: dict, source: str, where: str = "model") -> ModelConfig:
    """deepmd-kit's normalised `model_params` of one branch -> our ModelConfig."""
    o = _Options(params, where, source)
    o.require("type", lambda v: v == "standard", "standard", "(model type) is not supported by lamflow (only 'standard')")
    type_map = o.take("type_map")
    d = _Options(o.take("descriptor"), f"{where}.descriptor", source)
    dtype = d.raw.get("type")
    if dtype not in DESCRIPTOR_TAGS:
        raise d.error(f"descriptor type {dtype!r} is not supported by lamflow (supported: {sorted(DESCRIPTOR_TAGS)})")
    desc = DESCRIPTORS[DESCRIPTOR_CONFIGS[d.take("type")]](d, dtype)
    d.finish()
    f = _Options(o.take("fitting_net"), f"{where}.fitting_net", source)
    fit = _fitting(f)
    f.finish()
    cfg = {"type_map": type_map, "descriptor": desc, "fitting_net": fit,
           "data_stat_nbatch": o.take("data_stat_nbatch", 10), "data_stat_protect": o.take("data_stat_protect", 1e-2)}
    for key in ("pair_exclude_types", "atom_exclude_types"):
        o.require(key, _empty, [])
    for key in ("use_srtab", "spin", "modifier", "compress", "type_embedding"):
        o.require(key, _empty)
    o.require("bridging_method", lambda v: v in (None, "None", "none"), "None")
    # statistics-only or bookkeeping options: the trained weights and out_bias already hold their effect
    o.ignore("data_bias_nsample", "preset_out_bias", "srtab_add_bias", "smin_alpha", "sw_rmin", "sw_rmax",
             "bridging_r_inner", "bridging_r_outer", "model_branch_alias", "info", "finetune_head")
    o.finish()
    try:
        return ModelConfig.model_validate(cfg)
    except ValidationError as e:
        raise CheckpointError(format_validation_error(f"{source}: {where}", e, DESCRIPTOR_TAGS).splitlines()[0]) from None
