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
from typing import Any

import torch
from pydantic import ValidationError

from lamflow.model.errors import CheckpointError
from lamflow.model.io.deepmd_config import model_config
from lamflow.model.io.deepmd_names import NAMES, _check_padding_semantics, _names_fitting, _their_key, _unused_ok
from lamflow.model.io.files import atomic_save
from lamflow.model.io.payload import FORMAT, model_payload
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.multitask import MultiTaskModel
from lamflow.model.nn.potential import EnergyModel

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


# ----------------------------------------------------------------------------- weights


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
    names = NAMES[type(cfg.descriptor)](model, cfg, [k[len(prefix):] for k in tensors]) + _names_fitting(model, cfg)
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
