"""dpa3: DPA-3 descriptor (Zhang et al., "Graph neural network model for the era of large atomistic
models", arXiv 2506.01686), with deepmd-kit 3.2.0's conventions (DescrptDPA3, DescrptBlockRepflows,
RepFlowLayer).

One mixed-type edge list of N_e = e_sel slots within e_rcut, sorted by distance; the angle list is
its first N_a = a_sel slots, keeping those within a_rcut (deepmd-kit cuts it the same way).
r_ij = r_j - r_i, r = |r_ij|. Switches: sw_ij = the polynomial switch of env_mat.py (e_rcut_smth ->
e_rcut), or with use_exp_switch  sw(r) = exp(-exp(20 (r - r_s) / r_s)), r_s = e_rcut_smth (not exactly
0 at rcut: ~1e-6 for the recommended r_s); aw_ij likewise with a_rcut_smth, a_rcut, on the angle slots.
Env matrix R^_ij = sw_ij (1/r, r_ij/r^2) / std, std = fix_stat_std (0.3; from data if 0), mean 0.
act = activation_function (silu; silut:T = silu below T, tanh(silu'(T)(x - T)) + silu(T) above).

Inputs to the first layer (A_t = type embedding of width n_dim, zero row for padding):
    n_i    = act(A_{t_i})                                                     [n_dim]
    e_ij   = act(W_e R^_ij[0] + b)       (edge_init_use_dist: W_e r + b, no act)  [e_dim]
    h_ij   = R^_ij[1:4]                  (equivariant, never updated)          [3]
    cos_ijk = (u_ij . u_ik)(1 - 1e-6),  u = r_ij / (r + 1e-6), 0 off the angle list
    a_ijk  = W_a cos_ijk / sqrt(pi)       (no bias)                             [a_dim]
  n_j of a ghost neighbour is n of the local atom it images (mapping).

One RepFlow layer; lin(x) = W x + b; all updates are computed from the layer's inputs, then combined:
    node:  u_self  = act(lin(n_i))
           u_sym   = act(lin([S(e)_i, S(n_j)_i])),  hg(g)_i = (1/sqrt(N_e)) sum_j h_ij (x) g_ij sw_ij  [3, d]
                     S(g)_i = hg_i[:, :axis]^T hg_i / 3  flattened (row a, column c -> a d + c)
           u_msg^h = (1/N_e) sum_j act(lin([n_i, n_j, e_ij]))^h sw_ij    h < n_multi_edge_message heads
    edge:  u_self  = act(lin([n_i, n_j, e_ij]))
           u_ang   = act(W_2 m_ij + b_2),  m_ij = (1/sqrt(N_a)) sum_k aw_ij aw_ik act(lin([a_ijk, n~_i, e~_ik, e~_ij]))
                     for j on the angle list; m_ij = 0 elsewhere with smooth_edge_update, else m_ij = e_ij
    angle: u_self  = act(lin([a_ijk, n~_i, e~_ik, e~_ij]))
  n~, e~ are n, e themselves, or compressed (a_compress_rate c: n~ = W n to a_dim/c, e~ = W e to
  a_compress_e_rate a_dim/2c, no bias; a_compress_use_split: their first so many columns); e~ = 0 off
  the angle list. update_angle false drops u_ang and the angle channel.
  combine x <- [x, u_1..u_n] (update_style): res_residual x + sum_k r_k u_k (trainable r_k, init
  update_residual, or N(0, it) with norm); res_avg (x + sum u) / sqrt(n + 1); res_incr x + sum u / sqrt(n).
  sequential_update: edge self first (e' = e + r u_self), the angle from e', u_ang from the new angle
  and e', and the node updates from the final edge.
  use_dynamic_sel (deepmd-kit runs it on flat edge arrays): the same sums, with N_e, N_a replaced by
  N_e / sel_reduce_factor, N_a / sel_reduce_factor in the normalisations; computed densely here.
Output D_i = n_i of the last layer (+ [A_{t_i}] if concat_output_tebd); pair_feat = e_ij.

Why it is smooth and invariant: every sum over j carries sw_ij and every sum over k carries
aw_ij aw_ik, the normalisations use the fixed slot counts, and h enters only through h^T h. Not
smooth at a_rcut unless smooth_edge_update: an edge leaving the angle list switches m_ij from ~0 to e_ij
(deepmd-kit's default, kept for compatibility); nor exactly at rcut with use_exp_switch (sw ~1e-6 there).

Conventions kept for importing deepmd-kit weights: module names are deepmd-kit's (`repflows.layers.L.
node_self_mlp.matrix`, `repflows.mean`, `n_residual.0`, ...), except the type embedding
(`type_embedding.net.` for `type_embedding.embedding.embedding_net.`); `from_deepmd_key` renames it.
Layers store `matrix` [n_in, n_out]; the concatenated inputs above are in deepmd-kit's row order.
Deviations: empty slots read node 0 (masked, as deepmd-kit); exclude_types, use_econf_tebd and
add_chg_spin_ebd are rejected by the config; e_sel / a_sel default to "auto".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamflow.model.data.batch import auto_sel
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.errors import ConfigError
from lamflow.model.nn.descriptor.base import Descriptor, DescriptorOutput, TypeEmbedding, rename_deepmd_key
from lamflow.model.nn.descriptor.repformer import linear, residual_vector
from lamflow.model.nn.descriptor_config import DPA3Config, RepFlowConfig, dtype_name
from lamflow.model.nn.env_mat import EnvStat, gather_neighbors, switch
from lamflow.model.nn.network import ACTIVATIONS, DTYPES, make_generator

ANGLE_EPS = 1e-6  # deepmd-kit's protection of u = r / (|r| + eps) and cos * (1 - eps)


def silut(threshold: float):
    """deepmd-kit's SiLUT: silu below the threshold, a tanh with matching value and slope above."""
    sig = 1.0 / (1.0 + math.exp(-threshold))
    slope, const = sig + threshold * sig * (1.0 - sig), threshold * sig

    def act(x: Tensor) -> Tensor:
        return torch.where(x >= threshold, torch.tanh(slope * (x - threshold)) + const, F.silu(x))

    return act


def activation(name: str):
    base, _, threshold = name.partition(":")
    if base in ("silut", "custom_silu"):
        return silut(float(threshold or 3.0))
    return ACTIVATIONS[name]


def exp_switch(r: Tensor, rcut_smth: float, rcut: float) -> Tensor:
    return torch.exp(-torch.exp(20.0 / rcut_smth * (r.clamp(0.0, rcut) - rcut_smth)))


class RepFlowEnv(nn.Module):
    """The edge env matrix (mean 0, constant or data std), the angle list cut from the edge list,
    and the angle cosines."""

    def __init__(self, cfg: RepFlowConfig, ntypes: int, protection: float, dtype):
        super().__init__()
        self.cfg, self.protection = cfg, protection
        self.sw = exp_switch if cfg.use_exp_switch else switch
        self.register_buffer("mean", torch.zeros(ntypes, cfg.e_sel, 4, dtype=dtype))
        self.register_buffer("stddev", torch.full((ntypes, cfg.e_sel, 4), cfg.std or 1.0, dtype=dtype))

    def raw(self, coord_ext: Tensor, nlist: Tensor):
        """R [nf, nloc, N_e, 4] (un-normalised), r_ij (0 in empty slots), |r_ij| (1 in empty slots), sw."""
        nloc = nlist.shape[1]
        mask = nlist >= 0
        diff = gather_neighbors(coord_ext, nlist) - coord_ext[:, :nloc, None, :]  # [nf, nloc, N_e, 3]
        unit = torch.zeros_like(diff)
        unit[..., 0] = 1.0  # a harmless vector in empty slots: no 0/0 in any derivative
        diff = torch.where(mask[..., None], diff, unit)
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)  # [nf, nloc, N_e, 1]
        sw = self.sw(r, self.cfg.e_rcut_smth, self.cfg.e_rcut) * mask[..., None]
        inv = 1.0 / (r + self.protection)
        R = torch.cat([inv, diff * inv * inv], dim=-1) * sw  # [nf, nloc, N_e, 4]
        return R, diff * mask[..., None], r.squeeze(-1), sw.squeeze(-1)

    def forward(self, coord_ext: Tensor, atype: Tensor, nlist: Tensor):
        c, nnei = self.cfg, nlist.shape[2]
        R, diff, r, sw = self.raw(coord_ext, nlist)
        t = atype.clamp(min=0)
        R = (R - self.mean[t][:, :, :nnei]) / self.stddev[t][:, :, :nnei]  # [nf, nloc, N_e, 4]
        a_mask = (nlist[..., : c.a_sel] >= 0) & (r[..., : c.a_sel] < c.a_rcut)  # [nf, nloc, N_a]
        if c.use_dynamic_sel:  # the angle slots that hold a neighbour in some centre's list are a prefix
            a_mask = a_mask[..., : max(1, int(a_mask.flatten(0, 1).any(0).sum()))]
        na = a_mask.shape[-1]
        a_sw = self.sw(r[..., :na], c.a_rcut_smth, c.a_rcut) * a_mask
        u = diff[..., :na, :] / (r[..., :na, None] + ANGLE_EPS) * a_mask[..., None]  # [nf, nloc, N_a, 3]
        cos = (u @ u.transpose(-1, -2)) * (1.0 - ANGLE_EPS)  # [nf, nloc, N_a, N_a]
        dist = r * (nlist >= 0)  # [nf, nloc, N_e], 0 in empty slots
        return R, diff, dist, sw, a_mask, a_sw, cos

    @torch.no_grad()
    def set_stats(self, samples, protect: float) -> None:
        """std from data only when fix_stat_std is 0 (the mean stays 0, deepmd-kit's set_davg_zero)."""
        if self.cfg.std:
            return
        acc = EnvStat(self.mean.shape[0])
        for coord_ext, atype_ext, nlists in samples:
            R = self.raw(coord_ext.to(self.mean.dtype), nlists[0])[0]
            acc.add(R, atype_ext[:, : nlists[0].shape[1]])
        _, std = acc.mean_std(self.cfg.e_sel, protect, set_davg_zero=True)
        self.stddev.copy_(std.to(self.stddev))


def symmetrize(g: Tensor, h: Tensor, sw: Tensor, scale: float, axis: int) -> Tensor:
    """S(g)_i = hg^T[:axis] hg / 3 with hg = scale sum_j h_ij (x) g_ij sw_ij; g [nf, nloc, N_e, d] -> [nf, nloc, axis * d]."""
    hg = h.transpose(-1, -2) @ (g * sw[..., None]) * scale  # [nf, nloc, 3, d]
    return (hg[..., :axis].transpose(-1, -2) @ hg / 3.0).flatten(-2)


class RepFlowLayer(nn.Module):
    def __init__(self, cfg: RepFlowConfig, act, dtype, generator):
        super().__init__()
        c = self.cfg = cfg
        n, e, a = c.n_dim, c.e_dim, c.a_dim
        self.act = act
        lin = lambda n_in, n_out, bias=True: linear(n_in, n_out, bias, dtype=dtype, generator=generator)  # noqa: E731
        res = lambda dim: residual_vector(dim, c, dtype, generator)  # noqa: E731
        reduce = c.sel_reduce_factor if c.use_dynamic_sel else 1.0
        self.e_norm, self.a_norm = c.e_sel / reduce, c.a_sel / reduce  # N_e, N_a of the normalisations
        self.node_self_mlp = lin(n, n)
        self.node_sym_linear = lin((n + e) * c.axis_neuron, n)
        self.node_edge_linear = lin(2 * n + e, c.n_multi_edge_message * n)
        self.edge_self_linear = lin(2 * n + e, e)
        self.n_a, self.e_a = n, e  # widths of n~, e~
        self.a_compress_n_linear = self.a_compress_e_linear = None
        if c.update_angle:
            if c.a_compress_rate:
                self.n_a, self.e_a = a // c.a_compress_rate, a // (2 * c.a_compress_rate) * c.a_compress_e_rate
                if not c.a_compress_use_split:
                    self.a_compress_n_linear = lin(n, self.n_a, bias=False)
                    self.a_compress_e_linear = lin(e, self.e_a, bias=False)
            angle_in = a + self.n_a + 2 * self.e_a
            self.edge_angle_linear1 = lin(angle_in, e)
            self.edge_angle_linear2 = lin(e, e)
            self.angle_self_linear = lin(angle_in, a)
        residual = c.update_style == "res_residual"
        self.n_residual = nn.ParameterList([res(n) for _ in range(2 + c.n_multi_edge_message)] if residual else [])
        self.e_residual = nn.ParameterList([res(e) for _ in range(1 + c.update_angle)] if residual else [])
        self.a_residual = nn.ParameterList([res(a)] if residual and c.update_angle else [])

    # -- the concatenated linear maps, applied block by block (deepmd-kit's optim_update)
    def pair_linear(self, layer, n: Tensor, nei: Tensor, e: Tensor) -> Tensor:
        """lin([n_i, n_j, e_ij]) -> [nf, nloc, N_e, n_out]; nei [nf, nloc, N_e] local index of j."""
        w_i, w_j, w_e = layer.matrix.split([n.shape[-1], n.shape[-1], e.shape[-1]])
        return layer.bias + (n @ w_i).unsqueeze(2) + gather_neighbors(n @ w_j, nei) + e @ w_e

    def angle_linear(self, layer, a: Tensor, n_a: Tensor, e_a: Tensor) -> Tensor:
        """lin([a_ijk, n~_i, e~_ik, e~_ij]) -> [nf, nloc, N_a, N_a, n_out] (axis 2: j, axis 3: k)."""
        w_a, w_n, w_k, w_j = layer.matrix.split([a.shape[-1], n_a.shape[-1], e_a.shape[-1], e_a.shape[-1]])
        return (layer.bias + a @ w_a + (n_a @ w_n)[:, :, None, None] + (e_a @ w_k).unsqueeze(2)
                + (e_a @ w_j).unsqueeze(3))

    def angle_inputs(self, n: Tensor, e: Tensor, a_mask: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cfg
        if self.a_compress_n_linear is not None:
            n, e = self.a_compress_n_linear(n), self.a_compress_e_linear(e)
        elif c.a_compress_rate:
            n, e = n[..., : self.n_a], e[..., : self.e_a]
        return n, e[:, :, : a_mask.shape[-1]] * a_mask[..., None]  # [nf, nloc, n~], [nf, nloc, N_a, e~]

    # -- the updates
    def node_updates(self, n: Tensor, nei: Tensor, e: Tensor, h: Tensor, sw: Tensor) -> list[Tensor]:
        c = self.cfg
        scale = self.e_norm**-0.5
        sym = torch.cat([symmetrize(e, h, sw, scale, c.axis_neuron),
                         symmetrize(gather_neighbors(n, nei), h, sw, scale, c.axis_neuron)], dim=-1)
        msg = (self.act(self.pair_linear(self.node_edge_linear, n, nei, e)) * sw[..., None]).sum(2) / self.e_norm
        heads = msg.unflatten(-1, (c.n_multi_edge_message, c.n_dim)).unbind(-2)  # head h: columns h n_dim + c
        return [self.act(self.node_self_mlp(n)), self.act(self.node_sym_linear(sym)), *heads]

    def edge_angle_update(self, a: Tensor, n_a: Tensor, e_a: Tensor, e: Tensor, a_mask: Tensor, a_sw: Tensor) -> Tensor:
        c = self.cfg
        u = self.act(self.angle_linear(self.edge_angle_linear1, a, n_a, e_a))  # [nf, nloc, N_a, N_a, e_dim]
        m = (u * (a_sw[..., :, None] * a_sw[..., None, :])[..., None]).sum(3) / self.a_norm**0.5  # [nf, nloc, N_a, e_dim]
        m = F.pad(m, (0, 0, 0, e.shape[2] - m.shape[2]))  # [nf, nloc, N_e, e_dim]
        if not c.smooth_edge_update:
            on_list = F.pad(a_mask, (0, e.shape[2] - a_mask.shape[2]))
            m = torch.where(on_list[..., None], m, e)
        return self.act(self.edge_angle_linear2(m))

    def combine(self, updates: list[Tensor], residuals: nn.ParameterList) -> Tensor:
        style, x, rest = self.cfg.update_style, updates[0], updates[1:]
        if style == "res_avg":
            return sum(rest, x) / (len(updates)) ** 0.5
        if style == "res_incr":
            return x + sum(rest, torch.zeros_like(x)) / len(rest) ** 0.5 if rest else x
        return x + sum((r * u for r, u in zip(residuals, rest)), torch.zeros_like(x))

    def forward(self, n: Tensor, e: Tensor, a: Tensor, h: Tensor, nei: Tensor, sw: Tensor, a_mask: Tensor,
                a_sw: Tensor, last: bool = False):
        """n [nf, nloc, n_dim]; e [nf, nloc, N_e, e_dim]; a [nf, nloc, N_a, N_a, a_dim]; h [nf, nloc, N_e, 3];
        nei [nf, nloc, N_e]; sw [nf, nloc, N_e]; a_mask, a_sw [nf, nloc, N_a]. `last`: the angle
        channel is not needed after this layer, so its self update is skipped (it reaches no output)."""
        c = self.cfg
        if c.sequential_update:
            return self.forward_sequential(n, e, a, h, nei, sw, a_mask, a_sw)
        n_new = self.combine([n, *self.node_updates(n, nei, e, h, sw)], self.n_residual)
        e_up = [e, self.act(self.pair_linear(self.edge_self_linear, n, nei, e))]
        a_up = [a]
        if c.update_angle:
            n_a, e_a = self.angle_inputs(n, e, a_mask)
            e_up.append(self.edge_angle_update(a, n_a, e_a, e, a_mask, a_sw))
            if not last:
                a_up.append(self.act(self.angle_linear(self.angle_self_linear, a, n_a, e_a)))
        return n_new, self.combine(e_up, self.e_residual), self.combine(a_up, self.a_residual)

    def forward_sequential(self, n, e, a, h, nei, sw, a_mask, a_sw):
        e1 = e + self.e_residual[0] * self.act(self.pair_linear(self.edge_self_linear, n, nei, e))
        n_a, e_a = self.angle_inputs(n, e1, a_mask)
        a_new = a + self.a_residual[0] * self.act(self.angle_linear(self.angle_self_linear, a, n_a, e_a))
        e_new = e1 + self.e_residual[1] * self.edge_angle_update(a_new, n_a, e_a, e1, a_mask, a_sw)
        n_new = self.combine([n, *self.node_updates(n, nei, e_new, h, sw)], self.n_residual)
        return n_new, e_new, a_new


class Repflows(nn.Module):
    def __init__(self, cfg: RepFlowConfig, ntypes: int, act, protection: float, dtype, generator):
        super().__init__()
        self.cfg, self.act = cfg, act
        self.env = RepFlowEnv(cfg, ntypes, protection, dtype)
        self.edge_embd = linear(1, cfg.e_dim, dtype=dtype, generator=generator)
        self.angle_embd = linear(1, cfg.a_dim, bias=False, dtype=dtype, generator=generator)
        self.layers = nn.ModuleList(RepFlowLayer(cfg, act, dtype, generator) for _ in range(cfg.nlayers))

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlist: Tensor, n: Tensor, mapping: Tensor | None):
        """n [nf, nloc, n_dim]: type embedding of the local atoms. Returns n, e of the last layer, r_ij, sw."""
        if self.cfg.use_dynamic_sel:
            # deepmd-kit computes on flat arrays of the real edges and angles only; dense here, the
            # same function with the empty tail of the (nearest-first) list dropped
            nlist = nlist[..., : max(1, int((nlist >= 0).sum(-1).max()))]
        nf, nloc, nnei = nlist.shape
        R, diff, dist, sw, a_mask, a_sw, cos = self.env(coord_ext, atype_ext[:, :nloc], nlist)
        h = R[..., 1:]  # [nf, nloc, N_e, 3]
        if self.cfg.edge_init_use_dist:
            e = self.edge_embd(dist.unsqueeze(-1))
        else:
            e = self.act(self.edge_embd(R[..., :1]))  # [nf, nloc, N_e, e_dim]
        a = self.angle_embd(cos.unsqueeze(-1) / math.pi**0.5)  # [nf, nloc, N_a, N_a, a_dim]
        n = self.act(n)
        # neighbour j (an extended index) -> the local atom whose features it carries
        idx = nlist.clamp(min=0)
        nei = idx if mapping is None else torch.gather(mapping, 1, idx.reshape(nf, -1)).reshape(nf, nloc, nnei)
        for k, layer in enumerate(self.layers):
            n, e, a = layer(n, e, a, h, nei, sw, a_mask, a_sw, last=k == len(self.layers) - 1)
        return n, e, diff, sw, nlist


# deepmd-kit 3.2.0 DescrptDPA3 state_dict prefixes -> ours; every other key is the same
DEEPMD_PREFIXES = (
    ("type_embedding.embedding.embedding_net.", "type_embedding.net."),
    ("repflows.mean", "repflows.env.mean"),
    ("repflows.stddev", "repflows.env.stddev"),
)


def from_deepmd_key(key: str) -> str | None:
    """Name in DPA3.state_dict() of a deepmd-kit DescrptDPA3 state_dict key (without the model's
    `descriptor.` prefix); None for entries that hold no weights here."""
    return rename_deepmd_key(key, DEEPMD_PREFIXES)


class DPA3(Descriptor, config=DPA3Config):

    def __init__(self, cfg: DPA3Config, ntypes: int):
        super().__init__()
        rf = cfg.repflow
        for key in ("e_sel", "a_sel"):
            if not isinstance(getattr(rf, key), int):
                raise ConfigError(f"dpa3 repflow.{key} must be resolved to an int before building, got {getattr(rf, key)!r}")
        if rf.a_sel > rf.e_sel:
            raise ConfigError(f"dpa3 repflow.a_sel {rf.a_sel} must be <= e_sel {rf.e_sel}")
        if cfg.type_map is not None and len(cfg.type_map) != ntypes:
            raise ConfigError(f"dpa3 descriptor type_map {cfg.type_map} does not match the model's {ntypes} types")
        self.cfg, self.ntypes = cfg, ntypes
        dtype = DTYPES[dtype_name(cfg.precision)]
        g = make_generator(cfg.seed)
        act = activation(cfg.activation_function)
        self.type_embedding = TypeEmbedding(ntypes, rf.n_dim, use_bias=cfg.use_tebd_bias, dtype=dtype, generator=g)
        self.repflows = Repflows(rf, ntypes, act, cfg.env_protection, dtype, g)
        self.dim_out = rf.n_dim * (2 if cfg.concat_output_tebd else 1)
        if not cfg.trainable:
            self.requires_grad_(False)

    def nlist_requests(self) -> list[NlistRequest]:
        """One mixed edge list sorted by distance (the angle list is its head)."""
        return [NlistRequest(self.cfg.repflow.e_rcut, (self.cfg.repflow.e_sel,), mixed=True)]

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                mapping: Tensor | None = None) -> DescriptorOutput:
        """nlists as nlist_requests(); mapping [nf, nall] extended -> local index (may be None only
        when there are no ghost atoms)."""
        nlist = nlists[0]
        nloc = nlist.shape[1]
        if mapping is None and coord_ext.shape[1] != nloc:
            raise ValueError("dpa3 needs `mapping` (extended -> local atom) when there are ghost atoms")
        tebd = self.type_embedding(atype_ext[:, :nloc])  # [nf, nloc, n_dim]
        n, e, diff, sw, nlist = self.repflows(coord_ext, atype_ext, nlist, tebd, mapping)
        if self.cfg.concat_output_tebd:
            n = torch.cat([n, tebd], dim=-1)
        return DescriptorOutput(n, e, diff, sw, nlist)

    @staticmethod
    def resolve_sel(cfg: DPA3Config, counter) -> DPA3Config:
        """e_sel / a_sel "auto"/"auto:r" -> max total neighbour count within e_rcut / a_rcut * r."""
        rf, update = cfg.repflow, {}
        for key, rcut in (("e_sel", rf.e_rcut), ("a_sel", rf.a_rcut)):
            value = getattr(rf, key)
            if isinstance(value, str):
                ratio = 1.1 if value == "auto" else float(value.split(":")[1])
                update[key] = auto_sel([counter(rcut)[1]], ratio)[0]
        return cfg.model_copy(update={"repflow": rf.model_copy(update=update)})

    def set_stats(self, samples, protect: float = 1e-2) -> None:
        self.repflows.env.set_stats(list(samples), protect)
