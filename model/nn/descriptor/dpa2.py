"""dpa2: DPA-2 descriptor (Zhang et al., npj Comput. Mater. 10, 293 (2024); arXiv 2312.15492),
with deepmd-kit 3.2.0's conventions (DescrptDPA2, DescrptBlockRepformers, RepformerLayer).

Two mixed-type neighbour lists of the same atoms, each sorted by distance with a fixed number of
slots: repinit (rcut_1, N_1 = repinit.nsel) and repformer (rcut_2, N_2 = repformer.nsel); each
has its own normalised env matrix R^ (env_mat.py) with its own mean/std. A_t = type embedding
(base.py; zero row for empty slots), act = activation_function, sw_ij = switch of that list.

repinit (se_atten with attn_layer = 0, see se_atten.py), M1 = neuron[-1], M2 = axis_neuron:
    G_ij = N_e([R^_ij[0], A_{t_j}(, A_{t_i})])                                        concat
         = N_s(R^_ij[0]) * (N_t([A_{t_j}(, A_{t_i})]) * sw_ij) + N_s(R^_ij[0])          strip
    T_i  = (1/N_1) sum_j R^_ij^T G_ij        D_i = T_i^T T_i[:, :M2]  flattened       [M1 * M2]
  use_three_body (deepmd-kit's se_t_tebd block on a third list: three_body_rcut, N_3 = three_body_sel,
  its own R^; M3 = three_body_neuron[-1]), for neighbour pairs (j, k) of i:
    e_ijk = R^_ij[1:4] . R^_ik[1:4]
    H_ijk = N_3([e_ijk, A_{t_j}, A_{t_k}])                                              concat
          = N_3(e_ijk) * (N_3t([A_{t_j}, A_{t_k}]) * sw_ij sw_ik) + N_3(e_ijk)          strip
    D3_i  = (1/N_3^2) sum_jk e_ijk H_ijk                      D_i <- [D_i, D3_i]        [M1 * M2 + M3]
    g1_i = W_shape D_i (+ W_tebd A_{t_i})    no bias; W_shape only if dim D_i != g1_dim  [g1_dim]
repformer input (repformer list; all sums below run over its N_2 slots):
    g1_i = act(g1_i)     g2_ij = act(W_g2 R^_ij[0] + b)     h2_ij = R^_ij[1:4]
    (direct_dist: R^_ij[0] -> |r_ij| / rcut_2 and h2_ij = r_ij / rcut_2)
    gg1_ij = g1_{mapping(j)}: a ghost neighbour carries the features of the local atom it images.
Each layer computes every update from its inputs (g1, g2, h2), then combines them per channel.
  With w_ij = sw_ij, and 1/N the fixed 1/N_2 (smooth; else mask_ij and 1/(n_i + 1e-4), n_i the
  real neighbour count; 1/sqrt(.) where use_sqrt_nnei says so):
    hg(g)_i   = (1/sqrt(N_2) or 1/N_2) sum_j h2_ij (x) g_ij w_ij                        [3, d]
    sym(g)_i  = hg(g)_i[:, :M]^T hg(g)_i / 3   flattened (row a, column c -> a*d + c)   [M * d]
    conv_i    = (1/N_2) sum_j (W_c g2_ij) * gg1_ij w_ij                 (g1_out_conv, W_c: g2 -> g1)
              = (1/N_2) sum_j g2_ij * (W_c gg1_ij) w_ij                 (otherwise,   W_c: g1 -> g2)
    mlp_i     = act(W_1 [g1_i (unless g1_out_mlp), conv_i (unless g1_out_conv), sym(g2)_i (grrg),
                         sym(gg1)_i (drrd)] + b_1)
    attn1_i   = W_o concat_h (sum_j a^h_ij V^h gg1_ij) + b_o,
                a^h_ij = smooth-softmax_j(Q^h g1_i . K^h gg1_ij / sqrt(attn1_hidden))  (update_g1_has_attn)
    u1 = [g1_i, act(W_self g1_i + b) (g1_out_mlp), conv_i (g1_out_conv), mlp_i, attn1_i]
  pair channels, in every layer but the last:
    A^h_ijk = smooth-softmax_k(Q^h g2_ij . K^h g2_ik / sqrt(attn2_hidden) [* h2_ij . h2_ik if attn2_has_gate])
              * (h2_ij . h2_ik) / sqrt(3)
    u2 = [g2_ij, act(W_2 g2_ij + b_2), W_gg (g1_i * gg1_ij w_ij) (update_g2_has_g1g1),
          LN(W_o concat_h (sum_k A^h_ijk V^h g2_ik) + b_o) (update_g2_has_attn)]
    uh = [h2_ij, sum_h w_h sum_k A^h_ijk h2_ik (update_h2)]
  smooth-softmax over slots k (smooth): S <- (S + 20) sw_j sw_k - 20 (sw_j = 1 for attn1),
    P = softmax(S), P <- P sw_j sw_k, P = 0 on empty j or k; not smooth: empty k masked by -inf.
  combine u = [u_0, ..., u_n] (update_style): res_avg (u_0 + ... + u_n) / sqrt(n + 1);
    res_incr u_0 + (u_1 + ... + u_n) / sqrt(n); res_residual u_0 + sum_k r_k * u_k with trainable
    vectors r_k (init N(0, update_residual) or the constant update_residual).
Output D_i = g1_i of the last layer (+ [A_{t_i}] if concat_output_tebd)   [g1_dim (+ tebd_dim)].

Why it is smooth and invariant: every pair term is weighted by sw_ij (or by sw inside the +20
shifted softmax, which turns a slot at rcut into an empty slot, both scoring -20), the 1/N
factors use the fixed slot counts, and h2 enters only through h2 . h2 and h2^T h2 products.
One exception, as in deepmd-kit: a concat-mode repinit with set_davg_zero false is not continuous
at rcut_1 (a neighbour there has R^ = -mean/std like an empty slot but a different type
embedding in G); keep set_davg_zero (the default) or use strip mode, which multiplies by sw.

Conventions kept for importing deepmd-kit weights (module names are deepmd-kit's):
- Layers store `matrix` [n_in, n_out] (y = x matrix + bias); LayerNorm stores `matrix`, `bias`.
- attn2g_map.mapqk columns: d * 2H + m (m < H: query of head m, else key of head m - H);
  attn2_mh_apply.mapv columns and head_map rows: c * H + h; loc_attn.mapq columns d * H + h,
  loc_attn.mapkv columns c * H + h (c < attn1_hidden key, else value), loc_attn.head_map rows
  h * g1_dim + c (head-major); attn2_ev_apply.head_map is [H, 1] without bias.
- g1_residual / g2_residual / h2_residual are applied in the order of the update lists above.
- `g1_shape_tranform` is deepmd-kit's spelling. Only a few prefixes differ from deepmd-kit's
  state_dict (env stats live in `repinit.env` / `repformers.env`, the embedding nets are
  `repinit.net(_strip)` / `repinit_three_body.net(_strip)`, the type embedding
  `type_embedding.net`): `from_deepmd_key` renames them,
  and tests/model/test_dpa2.py checks the result against deepmd-kit 3.2.0's outputs to round-off.
Deviations: empty slots of repinit use the zero padding type embedding (deepmd-kit reads atom 0's,
which only matters, and breaks permutation invariance there, if repinit.set_davg_zero is false);
exclude_types and use_econf_tebd are rejected by the config; nsel defaults to "auto"; the
blocks' cutoffs and slot counts need not be ordered (deepmd-kit asserts repinit rcut and nsel
greater than the repformer's, since it cuts the inner lists from the repinit one; we build each
list on its own, which gives the same nearest-first lists).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lamflow.model.data.batch import auto_sel
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.errors import ConfigError
from lamflow.model.nn.descriptor.base import Descriptor, DescriptorOutput, EnvMatBlock, TypeEmbedding, rename_deepmd_key
from lamflow.model.nn.descriptor.repformer import Repformers, linear
from lamflow.model.nn.descriptor_config import DPA2Config, RepinitConfig, dtype_name
from lamflow.model.nn.env_mat import gather_neighbors
from lamflow.model.nn.network import DTYPES, EmbeddingNet, make_generator


class Repinit(nn.Module):
    """se_atten without attention, on the repinit list; the type embedding is DPA2's."""

    def __init__(self, cfg: RepinitConfig, ntypes: int, smooth: bool, protection: float, dtype, generator):
        super().__init__()
        self.cfg, self.smooth, self.nnei = cfg, smooth, cfg.nsel
        self.strip = cfg.tebd_input_mode == "strip"
        self.env = EnvMatBlock(cfg.rcut, cfg.rcut_smth, cfg.nsel, ntypes, dtype, protection, cfg.set_davg_zero)
        ntebd = cfg.tebd_dim * (1 if cfg.type_one_side else 2)
        net = lambda n_in: EmbeddingNet(n_in, cfg.neuron, cfg.activation_function, cfg.resnet_dt, dtype, generator)  # noqa: E731
        self.net = net(1 if self.strip else 1 + ntebd)
        self.net_strip = net(ntebd) if self.strip else None
        self.m1, self.m2 = cfg.neuron[-1], cfg.axis_neuron
        self.dim_out = self.m1 * self.m2

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlist: Tensor, tebd_ext: Tensor) -> Tensor:
        nloc = nlist.shape[1]
        mask = nlist >= 0
        R, _, sw = self.env(coord_ext, atype_ext[:, :nloc], nlist)  # [nf, nloc, N_1, 4]
        tebd_i = tebd_ext[:, :nloc]
        tebd_j = gather_neighbors(tebd_ext, nlist) * mask[..., None]  # empty slots: zero (padding type)
        pair = tebd_j if self.cfg.type_one_side else torch.cat([tebd_j, tebd_i.unsqueeze(2).expand_as(tebd_j)], -1)
        s = R[..., :1]
        if self.strip:
            Gs, Gt = self.net(s), self.net_strip(pair)
            G = Gs * (Gt * sw[..., None] if self.smooth else Gt) + Gs
        else:
            G = self.net(torch.cat([s, pair], dim=-1))  # [nf, nloc, N_1, M1]
        T = R.transpose(-1, -2) @ G / self.nnei  # [nf, nloc, 4, M1]
        return (T.transpose(-1, -2) @ T[..., : self.m2]).flatten(-2)  # [nf, nloc, M1 * M2]


class ThreeBody(nn.Module):
    """deepmd-kit's se_t_tebd block: embedding of the angle term e_ijk between neighbour pairs."""

    def __init__(self, cfg: RepinitConfig, ntypes: int, smooth: bool, protection: float, dtype, generator):
        super().__init__()
        self.smooth, self.nnei = smooth, cfg.three_body_sel
        self.strip = cfg.tebd_input_mode == "strip"
        self.env = EnvMatBlock(cfg.three_body_rcut, cfg.three_body_rcut_smth, cfg.three_body_sel, ntypes, dtype,
                               protection, cfg.set_davg_zero)
        net = lambda n_in: EmbeddingNet(n_in, cfg.three_body_neuron, cfg.activation_function, cfg.resnet_dt,  # noqa: E731
                                        dtype, generator)
        self.net = net(1 if self.strip else 1 + 2 * cfg.tebd_dim)
        self.net_strip = net(2 * cfg.tebd_dim) if self.strip else None
        self.dim_out = cfg.three_body_neuron[-1]

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlist: Tensor, tebd_ext: Tensor) -> Tensor:
        nloc, nnei = nlist.shape[1:]
        mask = nlist >= 0
        R, _, sw = self.env(coord_ext, atype_ext[:, :nloc], nlist)  # [nf, nloc, N_3, 4]
        e = R[..., 1:] @ R[..., 1:].transpose(-1, -2)  # [nf, nloc, N_3, N_3]
        tebd = gather_neighbors(tebd_ext, nlist) * mask[..., None]  # [nf, nloc, N_3, tebd]
        shape = (*nlist.shape, nnei, tebd.shape[-1])
        pair = torch.cat([tebd.unsqueeze(3).expand(shape), tebd.unsqueeze(2).expand(shape)], -1)  # [A_j, A_k]
        if self.strip:
            Hs, Ht = self.net(e.unsqueeze(-1)), self.net_strip(pair)
            if self.smooth:
                Ht = Ht * (sw.unsqueeze(-1) * sw.unsqueeze(-2)).unsqueeze(-1)
            H = Hs * Ht + Hs
        else:
            H = self.net(torch.cat([e.unsqueeze(-1), pair], dim=-1))  # [nf, nloc, N_3, N_3, M3]
        return (e.unsqueeze(-1) * H).sum(dim=(2, 3)) / (self.nnei * self.nnei)  # [nf, nloc, M3]


# deepmd-kit 3.2.0 DescrptDPA2 state_dict prefixes -> ours; every other key is the same
DEEPMD_PREFIXES = (
    ("type_embedding.embedding.embedding_net.", "type_embedding.net."),
    ("repinit.filter_layers.networks.0.", "repinit.net."),
    ("repinit.filter_layers_strip.networks.0.", "repinit.net_strip."),
    ("repinit_three_body.filter_layers.networks.0.", "repinit_three_body.net."),
    ("repinit_three_body.filter_layers_strip.networks.0.", "repinit_three_body.net_strip."),
    ("repinit_three_body.mean", "repinit_three_body.env.mean"),
    ("repinit_three_body.stddev", "repinit_three_body.env.stddev"),
    ("repinit.mean", "repinit.env.mean"),
    ("repinit.stddev", "repinit.env.stddev"),
    ("repformers.mean", "repformers.env.mean"),
    ("repformers.stddev", "repformers.env.stddev"),
)


def from_deepmd_key(key: str) -> str | None:
    """Name in DPA2.state_dict() of a deepmd-kit DescrptDPA2 state_dict key (without the model's
    `descriptor.` prefix); None for entries that hold no weights here (duplicate `_networks`
    views, compression tables)."""
    return rename_deepmd_key(key, DEEPMD_PREFIXES)


class DPA2(Descriptor, config=DPA2Config):

    def __init__(self, cfg: DPA2Config, ntypes: int):
        super().__init__()
        ri, rf = cfg.repinit, cfg.repformer
        for key, nsel in (("repinit.nsel", ri.nsel), ("repformer.nsel", rf.nsel), ("repinit.three_body_sel", ri.three_body_sel)):
            if not isinstance(nsel, int) and (key != "repinit.three_body_sel" or ri.use_three_body):
                raise ConfigError(f"dpa2 {key} must be resolved to an int before building, got {nsel!r}")
        if cfg.type_map is not None and len(cfg.type_map) != ntypes:
            raise ConfigError(f"dpa2 descriptor type_map {cfg.type_map} does not match the model's {ntypes} types")
        self.cfg, self.ntypes = cfg, ntypes
        dtype = DTYPES[dtype_name(cfg.precision)]
        g = make_generator(cfg.seed)
        self.type_embedding = TypeEmbedding(ntypes, ri.tebd_dim, use_bias=cfg.use_tebd_bias, dtype=dtype, generator=g)
        self.repinit = Repinit(ri, ntypes, cfg.smooth, cfg.env_protection, dtype, g)
        self.repinit_three_body = (ThreeBody(ri, ntypes, cfg.smooth, cfg.env_protection, dtype, g)
                                   if ri.use_three_body else None)
        self.repformers = Repformers(rf, ntypes, cfg.smooth, cfg.env_protection, dtype, g)
        dim_init = self.repinit.dim_out + (self.repinit_three_body.dim_out if ri.use_three_body else 0)
        # deepmd-kit's name (sic); an identity when the widths already agree
        self.g1_shape_tranform = (linear(dim_init, rf.g1_dim, bias=False, dtype=dtype, generator=g)
                                  if dim_init != rf.g1_dim else None)
        self.tebd_transform = (linear(ri.tebd_dim, rf.g1_dim, bias=False, dtype=dtype, generator=g)
                               if cfg.add_tebd_to_repinit_out else None)
        self.dim_out = rf.g1_dim + (ri.tebd_dim if cfg.concat_output_tebd else 0)
        if not cfg.trainable:
            self.requires_grad_(False)

    def nlist_requests(self) -> list[NlistRequest]:
        """[repinit, repformer(, three-body)]: mixed lists, each sorted by distance."""
        ri, rf = self.cfg.repinit, self.cfg.repformer
        reqs = [NlistRequest(ri.rcut, (ri.nsel,), mixed=True), NlistRequest(rf.rcut, (rf.nsel,), mixed=True)]
        if ri.use_three_body:
            reqs.append(NlistRequest(ri.three_body_rcut, (ri.three_body_sel,), mixed=True))
        return reqs

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                mapping: Tensor | None = None) -> DescriptorOutput:
        """nlists as nlist_requests(); mapping [nf, nall] extended -> local index (may be None only
        when there are no ghost atoms)."""
        nl_init, nl_rep = nlists[0], nlists[1]
        nloc = nl_init.shape[1]
        if mapping is None and coord_ext.shape[1] != nloc:
            raise ValueError("dpa2 needs `mapping` (extended -> local atom) when there are ghost atoms")
        tebd_ext = self.type_embedding(atype_ext)  # [nf, nall, tebd]
        tebd_i = tebd_ext[:, :nloc]
        g1 = self.repinit(coord_ext, atype_ext, nl_init, tebd_ext)  # [nf, nloc, M1 * M2]
        if self.repinit_three_body is not None:
            g1 = torch.cat([g1, self.repinit_three_body(coord_ext, atype_ext, nlists[2], tebd_ext)], dim=-1)
        if self.g1_shape_tranform is not None:
            g1 = self.g1_shape_tranform(g1)  # [nf, nloc, g1_dim]
        if self.tebd_transform is not None:
            g1 = g1 + self.tebd_transform(tebd_i)
        g1, g2, _, diff, sw = self.repformers(coord_ext, atype_ext, nl_rep, g1, mapping)
        if self.cfg.concat_output_tebd:
            g1 = torch.cat([g1, tebd_i], dim=-1)
        return DescriptorOutput(g1, g2, diff, sw, nl_rep)

    @staticmethod
    def resolve_sel(cfg: DPA2Config, counter) -> DPA2Config:
        """nsel "auto"/"auto:r" of each block -> max total neighbour count within its rcut * r."""

        def one(block, key: str, rcut: float) -> dict:
            value = getattr(block, key)
            if not isinstance(value, str):
                return {}
            ratio = 1.1 if value == "auto" else float(value.split(":")[1])
            _, total = counter(rcut)
            return {key: auto_sel([total], ratio)[0]}

        ri, rf = cfg.repinit, cfg.repformer
        ri_update = one(ri, "nsel", ri.rcut)
        if ri.use_three_body:
            ri_update |= one(ri, "three_body_sel", ri.three_body_rcut)
        return cfg.model_copy(update={"repinit": ri.model_copy(update=ri_update),
                                      "repformer": rf.model_copy(update=one(rf, "nsel", rf.rcut))})

    def set_stats(self, samples, protect: float = 1e-2) -> None:
        """Env-matrix mean/std of each block from its own list (samples: (coord_ext, atype_ext, nlists))."""
        samples = list(samples)
        self.repinit.env.set_stats(samples, protect, which=0)
        self.repformers.env.set_stats(samples, protect, which=1)
        if self.repinit_three_body is not None:
            self.repinit_three_body.env.set_stats(samples, protect, which=2)
