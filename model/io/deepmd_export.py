"""Export lamflow energy models as deepmd-kit 3.x PyTorch training checkpoints (`model.ckpt.pt`).

The inverse of deepmd_import.py, with the same name table read the other way:

    lamflow EnergyModel                      deepmd-kit (after `model.<branch>.atomic_model.`)
    descriptor.* / fitting.*                 the names deepmd_names.NAMES maps them from
    fitting.bias_atom_e [nt]                 fitting_net.bias_atom_e [nt, 1]
    out_bias [nt]                            out_bias [1, nt, 1]

plus what deepmd-kit's modules register and no lamflow prediction reads, so that deepmd-kit's
strict `load_state_dict` accepts the file: `_networks.*` (deepmd-kit registers each network list
twice), empty compression tables (`compress_info.K`, `compress_data.K`, `type_embd_data`),
`out_std` (ones) and `min_nbor_dist` (the checkpoint's, else deepmd-kit's "unknown", -1).

The file is `{"model": state_dict}` where `state_dict["_extra_state"]` holds `model_params`
(the deepmd-kit model section, every option spelled out from our typed config) and
`train_infos`: only tensors and plain data, so it loads with `torch.load(weights_only=True)`.
`deepmd.infer.DeepPot`, `dp --pt freeze` and `dp --pt compress` read it; importing it back
(`lamflow import-deepmd`) gives the same model bit for bit.

What deepmd-kit cannot express is refused in one line naming it: a DPA-1 `attn_mask` (deepmd-kit's
PyTorch DPA-1 accepts the key and never applies it), the atom-order-dependent empty-slot case
deepmd_import.py describes, a denoise head. A compressed lamflow model exports as the model it
was compressed from (kept in its checkpoint) plus the settings to pass to `dp compress`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lamflow.model.errors import CheckpointError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint
from lamflow.model.io.deepmd_names import NAMES, _check_padding_semantics, _names_fitting, _their_key
from lamflow.model.io.files import atomic_save
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor import dpa2, dpa3
from lamflow.model.nn.descriptor_config import DPA2Config, DPA3Config, SeAttenConfig, SeE2AConfig
from lamflow.model.nn.multitask import MultiTaskModel

# DPA-2 and DPA-3 modules keep deepmd-kit's names except these (DEEPMD_PREFIXES, read backwards)
RENAMED = {DPA2Config: dpa2.DEEPMD_PREFIXES, DPA3Config: dpa3.DEEPMD_PREFIXES}

NO_MIN_NBOR_DIST = -1.0  # deepmd-kit's model.py: "not computed"


# ----------------------------------------------------------------------------- config -> model_params


def descriptor_params(cfg, source: str) -> dict:
    """Our typed descriptor config -> deepmd-kit's descriptor section (the same key names)."""
    d = cfg.model_dump(mode="json")
    if isinstance(cfg, SeE2AConfig):
        _resolved(d["sel"], "descriptor.sel", source)
        return d
    if isinstance(cfg, SeAttenConfig):
        _resolved(d["sel"], "descriptor.sel", source)
        if cfg.attn_mask:
            raise CheckpointError(f"{source}: descriptor.attn_mask=True cannot be exported: deepmd-kit's PyTorch "
                                  "DPA-1 accepts attn_mask but never applies it")
        if cfg.type == "se_atten_v2":  # strip + smooth are what se_atten_v2 means in deepmd-kit
            if not cfg.smooth_type_embedding:
                raise CheckpointError(f"{source}: se_atten_v2 with smooth_type_embedding=False has no deepmd-kit "
                                      "counterpart (deepmd-kit's se_atten_v2 is always smooth)")
            for k in ("tebd_input_mode", "smooth_type_embedding"):
                d.pop(k)
        return d
    if isinstance(cfg, DPA2Config):
        for blk, key in (("repinit", "nsel"), ("repformer", "nsel")):
            _resolved(d[blk][key], f"descriptor.{blk}.{key}", source)
        if d["repformer"].get("ln_eps") is None:
            d["repformer"].pop("ln_eps", None)
        if d.get("type_map") is None:
            d.pop("type_map", None)
        return d
    if isinstance(cfg, DPA3Config):
        for key in ("e_sel", "a_sel"):
            _resolved(d["repflow"][key], f"descriptor.repflow.{key}", source)
        for key in ("type_map", "default_chg_spin"):
            if d.get(key) is None:
                d.pop(key, None)
        return d
    raise CheckpointError(f"{source}: descriptor type {getattr(cfg, 'type', type(cfg).__name__)!r} cannot be "
                          "exported to deepmd-kit (se_e2_a, se_atten, se_atten_v2, dpa2, dpa3)")


def _resolved(sel, key: str, source: str) -> None:
    if isinstance(sel, str):
        raise CheckpointError(f"{source}: {key}={sel!r} is not resolved to neighbour counts (export a trained model)")


def model_params(cfg: ModelConfig, source: str) -> dict:
    """One branch's deepmd-kit `model_params` (the normalised `model` section of input.json)."""
    return {
        "type": "standard",
        "type_map": list(cfg.type_map),
        "descriptor": descriptor_params(cfg.descriptor, source),
        "fitting_net": cfg.fitting_net.model_dump(mode="json"),
        "data_stat_nbatch": cfg.data_stat_nbatch,
        "data_stat_protect": cfg.data_stat_protect,
    }


# ----------------------------------------------------------------------------- weights -> state dict


def _renamed_names(model, prefixes) -> list[tuple[str, str]]:
    """(ours, theirs) prefix pairs for DPA-2 / DPA-3: the renamed prefixes, else the same name."""
    pairs = [(f"descriptor.{ours}", f"descriptor.{theirs}") for theirs, ours in prefixes]
    keys = [k for k in model.state_dict() if k.startswith("descriptor.")]
    for k in keys:
        if _their_key(k, pairs) is None:
            pairs.append((k, k))
    return pairs


def _deepmd_shape(key: str, value: torch.Tensor, ntypes: int) -> torch.Tensor:
    if key == "out_bias":
        return value.reshape(1, ntypes, 1)
    if key == "fitting_net.bias_atom_e":
        return value.reshape(ntypes, 1)
    return value


def _bookkeeping(tensors: dict[str, torch.Tensor], ntypes: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors deepmd-kit registers that hold no weight: aliases, empty tables, out_std."""
    extra = {}
    blocks: dict[str, set[int]] = {}
    for key, value in tensors.items():
        if ".filter_layers.networks." in key or ".filter_layers_strip.networks." in key:
            extra[key.replace(".networks.", "._networks.", 1)] = value
        if ".filter_layers.networks." in key and not key.startswith("fitting_net."):
            block, rest = key.split(".filter_layers.networks.", 1)
            blocks.setdefault(block, set()).add(int(rest.split(".", 1)[0]))
    for block, nets in blocks.items():
        empty = torch.zeros(0, dtype=tensors[f"{block}.mean"].dtype)
        for k in range(len(nets)):
            extra[f"{block}.compress_info.{k}"] = empty
            extra[f"{block}.compress_data.{k}"] = empty
        if not block.endswith(".sea"):  # the type-embedding blocks (se_atten, repinit, three-body)
            extra[f"{block}.type_embd_data"] = empty
    extra["out_std"] = torch.ones(1, ntypes, 1, dtype=torch.float64)
    return extra


def branch_state(model, source: str) -> dict[str, torch.Tensor]:
    """An EnergyModel's tensors under deepmd-kit's names (without the `model.<branch>.atomic_model.` prefix)."""
    cfg = model.cfg
    kind = type(cfg.descriptor)
    names = (_renamed_names(model, RENAMED[kind]) if kind in RENAMED else NAMES[kind](model, cfg, [])) + _names_fitting(model, cfg)
    ntypes = len(model.type_map)
    out = {}
    for key, value in model.state_dict().items():
        theirs = _their_key(key, names)
        if theirs is None:
            raise CheckpointError(f"{source}: lamflow's {key} has no deepmd-kit counterpart")
        out[theirs] = _deepmd_shape(theirs, value.detach().cpu().clone(), ntypes)
    out.update(_bookkeeping(out, ntypes, model.dtype))
    try:
        _check_padding_semantics(cfg, out, "", source)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("is not supported", "cannot be exported")) from None
    return out


# ----------------------------------------------------------------------------- public API


def export_payload(model, source: str, min_nbor_dist: float | None = None, branch: str | None = None) -> dict:
    """A deepmd-kit checkpoint dict for an EnergyModel, or a MultiTaskModel's energy branches
    (`branch` picks one of them as a single-task checkpoint)."""
    mind = torch.tensor(NO_MIN_NBOR_DIST if min_nbor_dist is None else float(min_nbor_dist), dtype=torch.float64)
    if isinstance(model, MultiTaskModel):
        if branch is not None:
            if branch not in model.cfg.branches:
                raise CheckpointError(f"{source}: no branch {branch!r}; branches: {list(model.cfg.branches)}")
            if branch not in model.energy_branches:
                raise CheckpointError(f"{source}: branch {branch!r} is a denoise head, which deepmd-kit has no model for")
            models = {"Default": model.branch_model(branch)}
        else:
            names = model.energy_branches
            if not names:
                raise CheckpointError(f"{source}: no energy branch to export (denoise heads have no deepmd-kit model)")
            models = {b: model.branch_model(b) for b in names}
    elif model.kind == "energy":
        if branch is not None:
            raise CheckpointError(f"{source}: a single-task model has no branch {branch!r}")
        models = {"Default": model}
    else:
        raise CheckpointError(f"{source}: a {model.kind} model cannot be exported "
                              "to deepmd-kit")
    sd: dict = {}
    for b, m in models.items():
        sd[f"model.{b}.min_nbor_dist"] = mind
        for key, value in branch_state(m, source).items():
            sd[f"model.{b}.atomic_model.{key}"] = value
    params = {b: model_params(m.cfg, source) for b, m in models.items()}
    sd["_extra_state"] = {
        "model_params": params["Default"] if list(models) == ["Default"] else {"model_dict": params},
        "train_infos": {"lr": 0.0, "step": 0},
    }
    return {"model": sd}


def compression_settings(payload: dict) -> dict | None:
    """`dp compress` arguments matching a compressed lamflow checkpoint (None for other kinds)."""
    if payload.get("kind") != "compressed":
        return None
    c = payload["config"]
    return {"stride": c["stride"], "extrapolate": c["extrapolate"], "check_frequency": c["check_frequency"],
            "min_nbor_dist": c["min_nbor_dist"]}


def export_deepmd(path: str | os.PathLike, out: str | os.PathLike, branch: str | None = None) -> tuple[Path, dict]:
    """`lamflow export-deepmd`: read a lamflow checkpoint, write a deepmd-kit one (atomically).
    Returns (out, info) where info says what was exported (branches, min_nbor_dist, compression)."""
    source = str(path)
    payload = read_checkpoint(path)
    compress = compression_settings(payload)
    if compress is not None:
        parent = payload.get("parent")
        if not isinstance(parent, dict):
            raise CheckpointError(f"{source}: this compressed checkpoint does not keep the model it was compressed "
                                  "from (written by an older lamflow): export that model and run `dp compress`")
        payload = parent
    model = build_from_payload(payload, source).eval()
    mind = payload.get("min_nbor_dist", compress["min_nbor_dist"] if compress else None)
    obj = export_payload(model, source, mind, branch)
    atomic_save(obj, out)
    params = obj["model"]["_extra_state"]["model_params"]
    info = {"branches": list(params.get("model_dict", {"Default": None})), "min_nbor_dist": mind,
            "compress": compress, "type_map": list(model.type_map), "kind": payload.get("kind", "energy")}
    return Path(out), info
