"""Tensor names, ours <-> deepmd-kit's, per descriptor and for the fitting net (the table in
io/deepmd_import.py), and the checks both directions share (io/deepmd_export.py reads them too)."""

from __future__ import annotations

import torch

from lamflow.model.errors import CheckpointError
from lamflow.model.nn.descriptor import dpa2, dpa3
from lamflow.model.nn.descriptor_config import DPA2Config, DPA3Config, SeAttenConfig, SeE2AConfig


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
    return _names_by_key(dpa2.from_deepmd_key, theirs)


def _names_dpa3(model, cfg, theirs: list[str]) -> list[tuple[str, str]]:
    """dpa3.py keeps deepmd-kit's module names; `from_deepmd_key` renames the few that differ."""
    return _names_by_key(dpa3.from_deepmd_key, theirs)


def _names_by_key(from_deepmd_key, theirs: list[str]) -> list[tuple[str, str]]:
    names = []
    for key in theirs:
        if key.startswith("descriptor.") and (ours := from_deepmd_key(key[len("descriptor."):])) is not None:
            names.append((f"descriptor.{ours}", key))
    return names


# descriptor config class -> its name table (a config's tags: nn/config.py DESCRIPTOR_CONFIGS)
NAMES = {SeE2AConfig: _names_se_e2_a, SeAttenConfig: _names_se_atten, DPA2Config: _names_dpa2, DPA3Config: _names_dpa3}


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
    if isinstance(d, SeAttenConfig):
        block, mode, smooth = "se_atten", ("strip" if d.strip else "concat"), d.smooth_type_embedding
    elif isinstance(d, DPA2Config):
        block, mode, smooth = "repinit", d.repinit.tebd_input_mode, d.smooth
    else:
        return
    mean = tensors.get(f"{prefix}descriptor.{block}.mean")
    if mean is not None and bool(mean.abs().max() > 0) and not (mode == "strip" and smooth):
        raise CheckpointError(
            f"{source}: {d.type} with a non-zero {block} env-matrix mean (set_davg_zero: false) in {mode} mode"
            f"{'' if smooth else ' without smoothing'} is not supported: deepmd-kit gives empty neighbour slots the "
            "type embedding of atom 0, so its energy depends on the atom order")
