"""Import deepmd-kit 3.x PyTorch training checkpoints (`model.ckpt.pt`) as lamflow models.

A deepmd-kit checkpoint is `torch.save({"model": state_dict, "optimizer": ...})`; the state dict
holds the weights under `model.<branch>.atomic_model.*` (branch "Default" for single-task
training) and, under `_extra_state`, the normalised input (`model_params`, every option spelled
out) and `train_infos`. We read it with `torch.load(weights_only=True)` (plain tensors and
containers only, nothing executed), then

  1. map `model_params` onto our typed configs (`ModelConfig`): every option that changes the
     predictions must be one we implement with the same value, or the import fails naming it;
     options that only steer training (seeds, statistics sample sizes, ...) are dropped;
  2. build our model from that config and copy every tensor by name (table below); a deepmd
     tensor left without a counterpart is an error, so nothing is silently dropped either.

    deepmd-kit (after `model.<branch>.atomic_model.`)             lamflow EnergyModel
    descriptor.sea.mean / stddev                                   descriptor.env.mean / stddev
    descriptor.sea.filter_layers.networks.<t_j*nt+t_i>.layers.<l>  descriptor.nets.<t_i*nt+t_j>.layers.<l>
    descriptor.type_embedding.embedding.embedding_net.layers.0     descriptor.type_embedding.net.layers.0
    descriptor.se_atten.filter_layers[_strip].networks.0.layers.<l>  descriptor.net[_strip].layers.<l>
    descriptor.se_atten.dpa1_attention.attention_layers.<i>.
        attention_layer.{in,out}_proj / attn_layer_norm.{matrix,bias}  descriptor.attention.<i>.{in,out}_proj / norm.{weight,bias}
    descriptor.{repinit,repinit_three_body,repformers,g1_shape_tranform,...}  the same names in DPA2, but for
                                                                   the few that dpa2.from_deepmd_key renames
    descriptor.{type_embedding,repflows}.*                         the same names in DPA3 (dpa3.from_deepmd_key)
    fitting_net.case_embd [dim_case_embd]                          folded into the first fitting layer's bias
    fitting_net.filter_layers.networks.<k>.layers.<l>              fitting.nets.<k>.hidden.layers.<l> (last: .out)
    fitting_net.bias_atom_e [nt, 1]                                fitting.bias_atom_e [nt]
    out_bias [1, nt, 1]                                            out_bias [nt]
Dropped on purpose: `_networks.*` (deepmd-kit's alias of `networks.*`, checked equal), `out_std`
and `min_nbor_dist` (statistics that no prediction reads), and the empty compression tables.

A multi-task checkpoint (`model_dict`) becomes one lamflow MultiTaskModel when its branches share
one descriptor (deepmd-kit's shared_level 0: same options and, checked, the same weights), else
one branch at a time (`branch=`, `lamflow import-deepmd --branch`).

The one deepmd-kit behaviour we do not reproduce: se_atten and DPA-2's repinit give empty
neighbour slots the type embedding of atom 0 of the frame (they gather with index 0 for -1). That
only reaches the energy when the env-matrix mean is non-zero (`set_davg_zero: false`) and the
empty-slot embedding depends on the type (concat mode, or strip mode without smoothing); such a
checkpoint is refused, since its energy depends on how the atoms are numbered.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError

from lamflow.model.io.payload import FORMAT, model_payload
from lamflow.model.io.files import atomic_save
from lamflow.model.nn.config import ModelConfig
from lamflow.model.schema import format_validation_error
from lamflow.model.errors import CheckpointError

_MISSING = object()
ACTIVATIONS = {"tanh", "gelu", "gelu_tf", "relu", "silu", "softplus", "sigmoid", "linear", "none"}


# ----------------------------------------------------------------------------- reading


def is_deepmd_payload(obj: Any) -> bool:
    """A deepmd-kit training checkpoint: {"model": state dict with "_extra_state"} (or the bare state dict)."""
    sd = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        sd = obj
    return isinstance(sd, dict) and isinstance(sd.get("_extra_state"), dict) and "model_params" in sd["_extra_state"]


def _state_dict(obj: dict) -> dict:
    return obj["model"] if isinstance(obj.get("model"), dict) and "_extra_state" in obj["model"] else obj


def read_deepmd(path: str | os.PathLike) -> dict:
    """The state dict of a deepmd-kit checkpoint; runs no code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a frozen TorchScript model (dp freeze / dp compress output); loading it would "
                              "run its code: import the training checkpoint (model.ckpt.pt) instead")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs classes or functions, or not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as plain tensors ({type(e).__name__}: {first[:200]})") from None
    if not is_deepmd_payload(obj):
        raise CheckpointError(f"{path}: not a deepmd-kit checkpoint (no model._extra_state.model_params)")
    return _state_dict(obj)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a code/ folder and constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def branches(sd: dict) -> list[str]:
    """Model branches of a checkpoint: ["Default"] for single-task, the model_dict keys otherwise."""
    params = sd["_extra_state"]["model_params"]
    return list(params["model_dict"]) if "model_dict" in params else ["Default"]


# ----------------------------------------------------------------------------- options -> config


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


DESCRIPTORS: dict[str, Callable[[_Options, str], dict]] = {
    "se_e2_a": _se_e2_a, "se_a": _se_e2_a,
    "se_atten": _se_atten, "dpa1": _se_atten, "se_atten_v2": _se_atten,
    "dpa2": _dpa2, "dpa3": _dpa3,
}


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


def model_config(params: dict, source: str, where: str = "model") -> ModelConfig:
    """deepmd-kit's normalised `model_params` of one branch -> our ModelConfig."""
    o = _Options(params, where, source)
    o.require("type", lambda v: v == "standard", "standard", "(model type) is not supported by lamflow (only 'standard')")
    type_map = o.take("type_map")
    d = _Options(o.take("descriptor"), f"{where}.descriptor", source)
    dtype = d.raw.get("type")
    if dtype not in DESCRIPTORS:
        raise d.error(f"descriptor type {dtype!r} is not supported by lamflow (supported: {sorted(DESCRIPTORS)})")
    desc = DESCRIPTORS[d.take("type")](d, dtype)
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
        raise CheckpointError(format_validation_error(f"{source}: {where}", e).splitlines()[0]) from None


# ----------------------------------------------------------------------------- weights


def _net(ours: str, theirs: str, nlayers: int, names: list[tuple[str, str]]) -> None:
    for i in range(nlayers):
        names.append((f"{ours}.layers.{i}.", f"{theirs}.layers.{i}."))


def _names_se_e2_a(model, cfg, theirs: list[str]) -> list[tuple[str, str]]:
    nt, d = len(cfg.type_map), cfg.descriptor
    names = [("descriptor.env.", "descriptor.sea.")]
    for k in range(len(model.descriptor.nets)):
        # ours: t_i * nt + t_j (two-sided) or t_j; deepmd-kit: t_j * nt + t_i or t_j
        theirs = k if d.type_one_side else (k % nt) * nt + k // nt
        _net(f"descriptor.nets.{k}", f"descriptor.sea.filter_layers.networks.{theirs}", len(d.neuron), names)
    return names


def _names_se_atten(model, cfg, theirs: list[str]) -> list[tuple[str, str]]:
    d, blk = cfg.descriptor, "descriptor.se_atten"
    names = [("descriptor.env.", f"{blk}."),
             ("descriptor.type_embedding.net.", "descriptor.type_embedding.embedding.embedding_net.")]
    _net("descriptor.net", f"{blk}.filter_layers.networks.0", len(d.neuron), names)
    if model.descriptor.strip:
        _net("descriptor.net_strip", f"{blk}.filter_layers_strip.networks.0", len(d.neuron), names)
    for i in range(d.attn_layer):
        ours, theirs = f"descriptor.attention.{i}", f"{blk}.dpa1_attention.attention_layers.{i}"
        names += [(f"{ours}.in_proj.", f"{theirs}.attention_layer.in_proj."),
                  (f"{ours}.out_proj.", f"{theirs}.attention_layer.out_proj."),
                  (f"{ours}.norm.weight", f"{theirs}.attn_layer_norm.matrix"),
                  (f"{ours}.norm.bias", f"{theirs}.attn_layer_norm.bias")]
    return names


def _names_dpa2(model, cfg, theirs: list[str]) -> list[tuple[str, str]]:
    """dpa2.py keeps deepmd-kit's module names; `from_deepmd_key` renames the few that differ."""
    from lamflow.model.nn.descriptor.dpa2 import from_deepmd_key

    return _names_by_key(from_deepmd_key, theirs)


def _names_dpa3(model, cfg, theirs: list[str]) -> list[tuple[str, str]]:
    """dpa3.py keeps deepmd-kit's module names; `from_deepmd_key` renames the few that differ."""
    from lamflow.model.nn.descriptor.dpa3 import from_deepmd_key

    return _names_by_key(from_deepmd_key, theirs)


def _names_by_key(from_deepmd_key, theirs: list[str]) -> list[tuple[str, str]]:
    names = []
    for key in theirs:
        if key.startswith("descriptor.") and (ours := from_deepmd_key(key[len("descriptor."):])) is not None:
            names.append((f"descriptor.{ours}", key))
    return names


NAMES = {"se_e2_a": _names_se_e2_a, "se_a": _names_se_e2_a,
         "se_atten": _names_se_atten, "dpa1": _names_se_atten, "se_atten_v2": _names_se_atten,
         "dpa2": _names_dpa2, "dpa3": _names_dpa3}


def _names_fitting(model, cfg) -> list[tuple[str, str]]:
    names = [("fitting.bias_atom_e", "fitting_net.bias_atom_e"), ("out_bias", "out_bias")]
    nh = len(cfg.fitting_net.neuron)
    for k in range(len(model.fitting.nets)):
        theirs = f"fitting_net.filter_layers.networks.{k}"
        _net(f"fitting.nets.{k}.hidden", theirs, nh, names)
        names.append((f"fitting.nets.{k}.out.", f"{theirs}.layers.{nh}."))
    return names


def _their_key(key: str, names: list[tuple[str, str]]) -> str | None:
    for ours, theirs in names:
        if key == ours:
            return theirs
        if ours.endswith(".") and key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def _unused_ok(key: str, value, tensors: dict, prefix: str) -> bool:
    """deepmd-kit tensors that legitimately have no lamflow counterpart."""
    leaf = key[len(prefix):]
    if leaf in ("out_std",) or key.endswith("min_nbor_dist"):
        return True
    if "._networks." in leaf:  # alias of `.networks.` (the same ModuleList registered twice)
        twin = tensors.get(key.replace("._networks.", ".networks."))
        return twin is not None and torch.equal(twin, value)
    if any(part in leaf for part in (".compress_info.", ".compress_data.")) or leaf.endswith(".type_embd_data"):
        return value.numel() == 0
    return False


def _check_padding_semantics(cfg, tensors: dict, prefix: str, source: str) -> None:
    """Refuse the one deepmd-kit behaviour we do not reproduce (module docstring)."""
    d = cfg.descriptor
    if d.type in ("se_atten", "dpa1", "se_atten_v2"):
        block, mode, smooth = "se_atten", ("strip" if d.strip else "concat"), d.smooth_type_embedding
    elif d.type == "dpa2":
        block, mode, smooth = "repinit", d.repinit.tebd_input_mode, d.smooth
    else:
        return
    mean = tensors.get(f"{prefix}descriptor.{block}.mean")
    if mean is not None and bool(mean.abs().max() > 0) and not (mode == "strip" and smooth):
        raise CheckpointError(
            f"{source}: {d.type} with a non-zero {block} env-matrix mean (set_davg_zero: false) in {mode} mode"
            f"{'' if smooth else ' without smoothing'} is not supported: deepmd-kit gives empty neighbour slots the "
            "type embedding of atom 0, so its energy depends on the atom order")


def fold_case_embd(tensors: dict, prefix: str, cfg: ModelConfig, dim_descrpt: int, source: str) -> dict:
    """deepmd-kit's dataset encoding (fitting `dim_case_embd`, DPA-3.x multi-task models): each
    branch feeds its fitting net [D_i, c] with c a constant one-hot (`fitting_net.case_embd`). Then
    [D, c] W + b = D W_D + (c W_c + b): the first layer keeps W_D and absorbs c W_c into its bias,
    the same function on the descriptor alone (refused where that would change the layer's residual
    rule, which depends on its input width)."""
    case = tensors.get(f"{prefix}fitting_net.case_embd")
    if case is None:
        return tensors
    tensors = dict(tensors)
    del tensors[f"{prefix}fitting_net.case_embd"]
    n0 = cfg.fitting_net.neuron[0]
    if (n0 in (dim_descrpt, 2 * dim_descrpt)) != (n0 in (dim_descrpt + case.numel(), 2 * (dim_descrpt + case.numel()))):
        raise CheckpointError(f"{source}: fitting_net.dim_case_embd {case.numel()} with neuron[0] {n0}: folding the case "
                              "embedding would change the first layer's residual connection")
    k = 0
    while f"{prefix}fitting_net.filter_layers.networks.{k}.layers.0.matrix" in tensors:
        layer = f"{prefix}fitting_net.filter_layers.networks.{k}.layers.0."
        W, b = tensors[layer + "matrix"], tensors[layer + "bias"]
        if W.shape[0] != dim_descrpt + case.numel():
            raise CheckpointError(f"{source}: {prefix}fitting_net.case_embd ({case.numel()}) does not fit the fitting "
                                  f"net's input width {W.shape[0]} (descriptor {dim_descrpt})")
        for key in (layer, layer.replace(".networks.", "._networks.")):  # and deepmd-kit's alias of it
            if key + "matrix" in tensors:
                tensors[key + "matrix"] = W[:dim_descrpt]
                tensors[key + "bias"] = b + case.to(W.dtype) @ W[dim_descrpt:]
        k += 1
    return tensors


def load_weights(model, cfg: ModelConfig, sd: dict, prefix: str, source: str) -> None:
    """Copy the deepmd-kit tensors under `prefix` (`model.<branch>.atomic_model.`) into `model`."""
    tensors = {k: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    tensors = fold_case_embd(tensors, prefix, cfg, model.descriptor.dim_out, source)
    names = NAMES[cfg.descriptor.type](model, cfg, [k[len(prefix):] for k in tensors]) + _names_fitting(model, cfg)
    ours = model.state_dict()
    used = set()
    new = {}
    for key, target in ours.items():
        theirs = _their_key(key, names)
        if theirs is None or prefix + theirs not in tensors:
            raise CheckpointError(f"{source}: no deepmd-kit weight for lamflow's {key}"
                                  + (f" (looked for {prefix + theirs})" if theirs else ""))
        value = tensors[prefix + theirs]
        if value.numel() != target.numel():
            raise CheckpointError(f"{source}: {prefix + theirs} has shape {tuple(value.shape)}, lamflow's {key} "
                                  f"needs {tuple(target.shape)}")
        new[key] = value.reshape(target.shape).to(target.dtype)
        used.add(prefix + theirs)
    for key, value in tensors.items():
        if key not in used and not _unused_ok(key, value, tensors, prefix):
            raise CheckpointError(f"{source}: deepmd-kit weight {key} {tuple(value.shape)} has no counterpart in "
                                  "lamflow (an option that creates it is not supported)")
    _check_padding_semantics(cfg, tensors, prefix, source)
    model.load_state_dict(new, strict=True)


# ----------------------------------------------------------------------------- public API


def convert_branch(sd: dict, branch: str, source: str):
    """One branch of a deepmd-kit state dict -> (EnergyModel, ModelConfig)."""
    from lamflow.model.nn.potential import EnergyModel

    params = sd["_extra_state"]["model_params"]
    if "model_dict" in params:
        if branch not in params["model_dict"]:
            raise CheckpointError(f"{source}: no branch {branch!r}; branches: {list(params['model_dict'])}")
        raw, where = params["model_dict"][branch], f"model_dict.{branch}"
    else:
        if branch != "Default":
            raise CheckpointError(f"{source}: single-task deepmd-kit checkpoint has no branch {branch!r} (only 'Default')")
        raw, where = params, "model"
    cfg = model_config(raw, source, where)
    try:
        model = EnergyModel(cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: {where}: {e}") from None
    load_weights(model, cfg, sd, f"model.{branch}.atomic_model.", source)
    return model.eval()


def convert_state(sd: dict, source: str, branch: str | None = None):
    """A deepmd-kit state dict (or the whole checkpoint dict) -> (model, branch).

    Single-task: the EnergyModel. Multi-task with `branch`: that branch as an EnergyModel.
    Multi-task without: every branch in one lamflow MultiTaskModel (kind "multitask"; branch
    None), which needs the branches to share their descriptor, as deepmd-kit's shared_level 0."""
    sd = _state_dict(sd)
    names = branches(sd)
    if branch is not None:
        return convert_branch(sd, branch, source), branch
    if len(names) == 1:
        return convert_branch(sd, names[0], source), names[0]
    return convert_multitask(sd, names, source), None


def convert_multitask(sd: dict, names: list[str], source: str):
    """All branches of a multi-task checkpoint -> lamflow MultiTaskModel (shared descriptor, one head each)."""
    try:
        from lamflow.model.training.multitask import MultiTaskModel
    except ImportError:
        raise CheckpointError(f"{source}: multi-task checkpoint with branches {names}; this lamflow has no multi-task "
                              "models: import one branch with --branch") from None
    models = {b: convert_branch(sd, b, source) for b in names}
    first, ref = models[names[0]], models[names[0]].descriptor.state_dict()
    for b, m in models.items():
        same = (m.cfg.descriptor == first.cfg.descriptor and m.type_map == first.type_map
                and all(torch.equal(v, ref[k]) for k, v in m.descriptor.state_dict().items()))
        if not same:
            raise CheckpointError(f"{source}: branches {names[0]!r} and {b!r} do not share one descriptor (type map, "
                                  "options and weights), which a lamflow multi-task model needs: import one branch "
                                  "at a time with --branch")
    config = {"type_map": list(first.type_map), "descriptor": first.cfg.descriptor.model_dump(mode="json"),
              "branches": {b: {"task": "ener", "type_map": list(m.type_map),
                               "fitting_net": m.cfg.fitting_net.model_dump(mode="json")} for b, m in models.items()},
              "data_stat_nbatch": first.cfg.data_stat_nbatch, "data_stat_protect": first.cfg.data_stat_protect}
    try:
        model = MultiTaskModel.from_config(config)
    except (ValidationError, ValueError) as e:
        raise CheckpointError(f"{source}: the branches do not fit a lamflow multi-task model ({str(e).splitlines()[0]}): "
                              "import one branch at a time with --branch") from None
    state = {f"descriptor.{k}": v for k, v in ref.items()}
    for b, m in models.items():
        state.update({f"heads.{b}.fitting.{k}": v for k, v in m.fitting.state_dict().items()})
        state[f"heads.{b}.out_bias"] = m.out_bias
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert(path: str | os.PathLike, branch: str | None = None):
    """Read a deepmd-kit checkpoint file -> (model, branch); see convert_state."""
    return convert_state(read_deepmd(path), str(path), branch)


def _payload(model, source: str, branch: str) -> dict:
    return model_payload(model, extra={"imported_from": {"deepmd_checkpoint": source, "branch": branch}})


def import_deepmd(path: str | os.PathLike, out: str | os.PathLike, branch: str | None = None) -> Path:
    """`lamflow import-deepmd`: convert and write a lamflow checkpoint (atomically)."""
    model, branch = convert(path, branch)
    return atomic_save(_payload(model, str(path), branch), out)


def payload_from_deepmd(obj: dict, source: str, branch: str | None = None) -> dict:
    """The lamflow checkpoint payload of an already-loaded deepmd-kit checkpoint (`read_checkpoint` uses it)."""
    model, branch = convert_state(obj, source, branch)
    return _payload(model, source, branch)


def is_deepmd_checkpoint(path: str | os.PathLike) -> bool:
    """True for a file that reads as plain tensors and has deepmd-kit's layout."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") != FORMAT and is_deepmd_payload(obj)


def ensure_lamflow_checkpoint(path: str | os.PathLike, branch: str | None = None,
                              workdir: str | os.PathLike | None = None) -> Path:
    """`path` itself if it is a lamflow checkpoint, else a converted copy written into `workdir`."""
    path = Path(path)
    if not is_deepmd_checkpoint(path):
        return path
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lamflow-import-"))
    return import_deepmd(path, workdir / f"{path.stem}{'-' + branch if branch else ''}.lamflow.pt", branch)
