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
  and tests/test_dpa2.py checks the result against deepmd-kit 3.2.0's outputs to round-off.
Deviations: empty slots of repinit use the zero padding type embedding (deepmd-kit reads atom 0's,
which only matters, and breaks permutation invariance there, if repinit.set_davg_zero is false);
exclude_types and use_econf_tebd are rejected by the config; nsel defaults to "auto"; the
blocks' cutoffs and slot counts need not be ordered (deepmd-kit asserts repinit rcut and nsel
greater than the repformer's, since it cuts the inner lists from the repinit one; we build each
list on its own, which gives the same nearest-first lists).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamflow.model.nn.config import DPA2Config, RepformerConfig, RepinitConfig, dtype_name
from lamflow.model.data.batch import auto_sel
from lamflow.model.nn.env_mat import gather_neighbors
from lamflow.model.errors import ConfigError
from lamflow.model.nn.network import ACTIVATIONS, DTYPES, EmbeddingNet, Layer, make_generator
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.descriptor.base import Descriptor, DescriptorOutput, EnvMatBlock, TypeEmbedding, rename_deepmd_key

ATTN_SHIFT = 20.0
NNEI_EPS = 1e-4  # protection of 1/n_i in the non-smooth normalisation


def linear(n_in: int, n_out: int, bias: bool = True, *, dtype, generator) -> Layer:
    return Layer(n_in, n_out, None, bias=bias, dtype=dtype, generator=generator)


def residual_vector(dim: int, cfg: RepformerConfig, dtype, generator) -> nn.Parameter:
    if cfg.update_residual_init == "const":
        return nn.Parameter(torch.full((dim,), cfg.update_residual, dtype=dtype))
    return nn.Parameter(cfg.update_residual * torch.randn(dim, dtype=dtype, generator=generator))


class LayerNorm(nn.Module):
    """deepmd-kit's LayerNorm: (x - mean) / sqrt(var + eps) * matrix + bias over the last axis."""

    def __init__(self, n: int, eps: float, trainable: bool, dtype):
        super().__init__()
        self.eps = eps
        self.matrix = nn.Parameter(torch.ones(n, dtype=dtype), requires_grad=trainable)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype), requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.matrix, self.bias, self.eps)


def smooth_softmax(S: Tensor, w: Tensor, mask: Tensor, smooth: bool) -> Tensor:
    """Softmax over the last axis (slots k). w: sw_j sw_k (or sw_k) broadcast to S; mask: slot k real."""
    if smooth:
        S = (S + ATTN_SHIFT) * w - ATTN_SHIFT
    else:
        S = S.masked_fill(~mask, float("-inf"))
    P = torch.softmax(S, dim=-1).masked_fill(~mask, 0.0)
    return P * w if smooth else P


class Atten2Map(nn.Module):
    """Gated multi-head attention weights between the pairs (i, j) and (i, k) of one centre."""

    def __init__(self, g2_dim: int, hidden: int, nhead: int, has_gate: bool, smooth: bool, dtype, generator):
        super().__init__()
        self.hidden, self.nhead, self.has_gate, self.smooth = hidden, nhead, has_gate, smooth
        self.mapqk = linear(g2_dim, 2 * hidden * nhead, bias=False, dtype=dtype, generator=generator)

    def forward(self, g2: Tensor, h2: Tensor, mask: Tensor, sw: Tensor) -> Tensor:
        nf, nloc, nnei, _ = g2.shape
        d, H = self.hidden, self.nhead
        qk = self.mapqk(g2).view(nf, nloc, nnei, d, 2 * H).permute(0, 1, 4, 2, 3)  # [nf, nloc, 2H, nnei, d]
        q, k = qk.split(H, dim=2)  # each [nf, nloc, H, nnei, d]
        hh = (h2 @ h2.transpose(-1, -2)).unsqueeze(2)  # [nf, nloc, 1, nnei, nnei]
        S = q @ k.transpose(-1, -2) / d**0.5  # [nf, nloc, H, nnei, nnei]
        if self.has_gate:
            S = S * hh
        w = (sw[..., :, None] * sw[..., None, :]).unsqueeze(2)  # [nf, nloc, 1, nnei, nnei]
        P = smooth_softmax(S, w, mask[:, :, None, None, :], self.smooth)
        P = P.masked_fill(~mask[:, :, None, :, None], 0.0)  # empty j
        return P * hh / 3.0**0.5  # [nf, nloc, H, nnei, nnei]


class Atten2MultiHeadApply(nn.Module):
    """sum_k A^h_jk V^h g2_k for every head, then a linear map of the concatenated heads."""

    def __init__(self, g2_dim: int, nhead: int, dtype, generator):
        super().__init__()
        self.nhead = nhead
        self.mapv = linear(g2_dim, g2_dim * nhead, bias=False, dtype=dtype, generator=generator)
        self.head_map = linear(g2_dim * nhead, g2_dim, dtype=dtype, generator=generator)

    def forward(self, A: Tensor, g2: Tensor) -> Tensor:
        nf, nloc, nnei, ng2 = g2.shape
        v = self.mapv(g2).view(nf, nloc, nnei, ng2, self.nhead).permute(0, 1, 4, 2, 3)  # [nf, nloc, H, nnei, ng2]
        out = (A @ v).permute(0, 1, 3, 4, 2).reshape(nf, nloc, nnei, ng2 * self.nhead)  # column c * H + h
        return self.head_map(out)  # [nf, nloc, nnei, ng2]


class Atten2EquiVarApply(nn.Module):
    """sum_h w_h sum_k A^h_jk h2_k: an equivariant update of h2."""

    def __init__(self, nhead: int, dtype, generator):
        super().__init__()
        self.head_map = linear(nhead, 1, bias=False, dtype=dtype, generator=generator)

    def forward(self, A: Tensor, h2: Tensor) -> Tensor:
        out = A @ h2.unsqueeze(2)  # [nf, nloc, H, nnei, 3]
        return self.head_map(out.permute(0, 1, 3, 4, 2)).squeeze(-1)  # [nf, nloc, nnei, 3]


class LocalAtten(nn.Module):
    """Multi-head attention of centre i (query from g1_i) over its neighbours' g1."""

    def __init__(self, g1_dim: int, hidden: int, nhead: int, smooth: bool, dtype, generator):
        super().__init__()
        self.hidden, self.nhead, self.smooth = hidden, nhead, smooth
        self.mapq = linear(g1_dim, hidden * nhead, bias=False, dtype=dtype, generator=generator)
        self.mapkv = linear(g1_dim, (hidden + g1_dim) * nhead, bias=False, dtype=dtype, generator=generator)
        self.head_map = linear(g1_dim * nhead, g1_dim, dtype=dtype, generator=generator)

    def forward(self, g1: Tensor, gg1: Tensor, mask: Tensor, sw: Tensor) -> Tensor:
        nf, nloc, nnei, ng1 = gg1.shape
        d, H = self.hidden, self.nhead
        q = self.mapq(g1).view(nf, nloc, d, H).permute(0, 1, 3, 2)  # [nf, nloc, H, d]
        kv = self.mapkv(gg1).view(nf, nloc, nnei, d + ng1, H).permute(0, 1, 4, 2, 3)  # [nf, nloc, H, nnei, d+ng1]
        k, v = kv.split([d, ng1], dim=-1)
        S = (q.unsqueeze(-2) @ k.transpose(-1, -2)).squeeze(-2) / d**0.5  # [nf, nloc, H, nnei]
        P = smooth_softmax(S, sw.unsqueeze(2), mask.unsqueeze(2), self.smooth)
        out = (P.unsqueeze(-2) @ v).squeeze(-2).reshape(nf, nloc, H * ng1)  # head-major: h * ng1 + c
        return self.head_map(out)  # [nf, nloc, ng1]


class RepformerLayer(nn.Module):
    def __init__(self, cfg: RepformerConfig, nnei: int, last: bool, smooth: bool, dtype, generator):
        super().__init__()
        g1d, g2d, ax = cfg.g1_dim, cfg.g2_dim, cfg.axis_neuron
        lin = lambda a, b, bias=True: linear(a, b, bias, dtype=dtype, generator=generator)  # noqa: E731
        self.cfg, self.nnei, self.smooth = cfg, nnei, smooth
        self.act = ACTIVATIONS[cfg.activation_function]
        self.update_chnnl_2 = not last  # the last layer updates g1 only
        self.has_g1g1 = cfg.update_g2_has_g1g1 and not last
        self.has_attn2 = cfg.update_g2_has_attn and not last
        self.has_h2 = cfg.update_h2 and not last
        n_mlp = (0 if cfg.g1_out_mlp else g1d) + (g2d * ax if cfg.update_g1_has_grrg else 0) \
            + (g1d * ax if cfg.update_g1_has_drrd else 0) + (g2d if cfg.update_g1_has_conv and not cfg.g1_out_conv else 0)
        self.linear1 = lin(n_mlp, g1d)
        self.linear2 = lin(g2d, g2d) if self.update_chnnl_2 else None
        self.g1_self_mlp = lin(g1d, g1d) if cfg.g1_out_mlp else None
        self.proj_g1g2 = None
        if cfg.update_g1_has_conv:
            self.proj_g1g2 = lin(g2d, g1d, False) if cfg.g1_out_conv else lin(g1d, g2d, False)
        self.proj_g1g1g2 = lin(g1d, g2d, False) if self.has_g1g1 else None
        self.attn2g_map = (Atten2Map(g2d, cfg.attn2_hidden, cfg.attn2_nhead, cfg.attn2_has_gate, smooth, dtype, generator)
                           if self.has_attn2 or self.has_h2 else None)
        self.attn2_mh_apply = Atten2MultiHeadApply(g2d, cfg.attn2_nhead, dtype, generator) if self.has_attn2 else None
        eps = 1e-5 if cfg.ln_eps is None else cfg.ln_eps
        self.attn2_lm = LayerNorm(g2d, eps, cfg.trainable_ln, dtype) if self.has_attn2 else None
        self.attn2_ev_apply = Atten2EquiVarApply(cfg.attn2_nhead, dtype, generator) if self.has_h2 else None
        self.loc_attn = (LocalAtten(g1d, cfg.attn1_hidden, cfg.attn1_nhead, smooth, dtype, generator)
                         if cfg.update_g1_has_attn else None)
        # one residual vector per update term (res_residual), in update-list order
        n1 = 1 + cfg.g1_out_mlp + (cfg.update_g1_has_conv and cfg.g1_out_conv) + cfg.update_g1_has_attn
        n2 = (1 + self.has_g1g1 + self.has_attn2) if self.update_chnnl_2 else 0
        res = cfg.update_style == "res_residual"
        self.g1_residual = nn.ParameterList([residual_vector(g1d, cfg, dtype, generator) for _ in range(n1 if res else 0)])
        self.g2_residual = nn.ParameterList([residual_vector(g2d, cfg, dtype, generator) for _ in range(n2 if res else 0)])
        self.h2_residual = nn.ParameterList([residual_vector(1, cfg, dtype, generator) for _ in range(int(self.has_h2 and res))])

    def inv_nnei(self, mask: Tensor, sqrt: bool) -> Tensor | float:
        """1/N_2 (smooth) or 1/(n_i + eps) per centre [nf, nloc, 1], optionally under a square root."""
        if self.smooth:
            return self.nnei**-0.5 if sqrt else 1.0 / self.nnei
        n = mask.sum(-1, keepdim=True).to(self.linear1.matrix.dtype)
        return 1.0 / (NNEI_EPS + (n.sqrt() if sqrt else n))

    def weigh(self, g: Tensor, mask: Tensor, sw: Tensor) -> Tensor:
        """Zero empty slots and, if smooth, scale by the switch: [nf, nloc, nnei, d]."""
        g = g.masked_fill(~mask.unsqueeze(-1), 0.0)
        return g * sw.unsqueeze(-1) if self.smooth else g

    def sym(self, g: Tensor, h2: Tensor, mask: Tensor, sw: Tensor) -> Tensor:
        """grrg / drrd: hg = s_N sum_j h2_j (x) g_j w_j [3, d]; hg[:, :M]^T hg / 3 flattened [M * d]."""
        inv = self.inv_nnei(mask, self.cfg.use_sqrt_nnei)
        if isinstance(inv, Tensor):
            inv = inv.unsqueeze(-1)  # [nf, nloc, 1, 1]
        hg = h2.transpose(-1, -2) @ self.weigh(g, mask, sw) * inv  # [nf, nloc, 3, d]
        M = self.cfg.axis_neuron
        return (hg[..., :M].transpose(-1, -2) @ hg / 3.0).flatten(-2)  # [nf, nloc, M * d]

    def conv(self, gg1: Tensor, g2: Tensor, mask: Tensor, sw: Tensor) -> Tensor:
        if self.cfg.g1_out_conv:
            pair = self.proj_g1g2(g2) * self.weigh(gg1, mask, sw)  # [nf, nloc, nnei, g1]
        else:
            pair = g2 * self.weigh(self.proj_g1g2(gg1), mask, sw)  # [nf, nloc, nnei, g2]
        return pair.sum(dim=2) * self.inv_nnei(mask, sqrt=False)

    def combine(self, updates: list[Tensor], residuals: nn.ParameterList) -> Tensor:
        style, n = self.cfg.update_style, len(updates) - 1
        if style == "res_avg":
            return sum(updates[1:], updates[0]) / (n + 1) ** 0.5
        if style == "res_incr":
            return updates[0] + (sum(updates[1:], torch.zeros_like(updates[0])) / n**0.5 if n else 0.0)
        return updates[0] + sum((r * u for r, u in zip(residuals, updates[1:])), torch.zeros_like(updates[0]))

    def forward(self, g1: Tensor, g2: Tensor, h2: Tensor, nei: Tensor, mask: Tensor, sw: Tensor):
        """g1 [nf, nloc, g1]; g2 [nf, nloc, nnei, g2]; h2 [nf, nloc, nnei, 3]; nei [nf, nloc, nnei]:
        local index of each neighbour (0 in empty slots); mask, sw [nf, nloc, nnei]."""
        c = self.cfg
        gg1 = gather_neighbors(g1, nei)  # [nf, nloc, nnei, g1]
        u1, mlp_in = [g1], ([] if c.g1_out_mlp else [g1])
        if self.g1_self_mlp is not None:
            u1.append(self.act(self.g1_self_mlp(g1)))
        u2, uh = [g2], [h2]
        if self.update_chnnl_2:
            u2.append(self.act(self.linear2(g2)))
            if self.has_g1g1:
                u2.append(self.proj_g1g1g2(self.weigh(g1.unsqueeze(2) * gg1, mask, sw)))
            if self.attn2g_map is not None:
                A = self.attn2g_map(g2, h2, mask, sw)  # [nf, nloc, H, nnei, nnei]
                if self.has_attn2:
                    u2.append(self.attn2_lm(self.attn2_mh_apply(A, g2)))
                if self.has_h2:
                    uh.append(self.attn2_ev_apply(A, h2))
        if c.update_g1_has_conv:
            (u1 if c.g1_out_conv else mlp_in).append(self.conv(gg1, g2, mask, sw))
        if c.update_g1_has_grrg:
            mlp_in.append(self.sym(g2, h2, mask, sw))
        if c.update_g1_has_drrd:
            mlp_in.append(self.sym(gg1, h2, mask, sw))
        u1.append(self.act(self.linear1(torch.cat(mlp_in, dim=-1))))
        if self.loc_attn is not None:
            u1.append(self.loc_attn(g1, gg1, mask, sw))
        g1_new = self.combine(u1, self.g1_residual)
        if not self.update_chnnl_2:
            return g1_new, g2, h2
        return g1_new, self.combine(u2, self.g2_residual), self.combine(uh, self.h2_residual)


def safe_norm(x: Tensor) -> Tensor:
    """|x| over the last axis with a zero gradient at x = 0 (empty slots). [..., 1]"""
    nonzero = (x * x).sum(-1, keepdim=True) > 0
    safe = torch.where(nonzero, x, torch.ones_like(x))
    return torch.where(nonzero, torch.linalg.vector_norm(safe, dim=-1, keepdim=True), torch.zeros_like(nonzero, dtype=x.dtype))


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


class Repformers(nn.Module):
    def __init__(self, cfg: RepformerConfig, ntypes: int, smooth: bool, protection: float, dtype, generator):
        super().__init__()
        self.cfg, self.nnei = cfg, cfg.nsel
        self.act = ACTIVATIONS[cfg.activation_function]
        self.env = EnvMatBlock(cfg.rcut, cfg.rcut_smth, cfg.nsel, ntypes, dtype, protection, cfg.set_davg_zero)
        self.g2_embd = linear(1, cfg.g2_dim, dtype=dtype, generator=generator)
        self.layers = nn.ModuleList(
            RepformerLayer(cfg, cfg.nsel, i == cfg.nlayers - 1, smooth, dtype, generator) for i in range(cfg.nlayers)
        )

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlist: Tensor, g1: Tensor, mapping: Tensor | None):
        """g1 [nf, nloc, g1_dim] of the local atoms; returns g1, g2, h2 of the last layer, r_ij, sw."""
        nf, nloc, nnei = nlist.shape
        mask = nlist >= 0
        R, diff, sw = self.env(coord_ext, atype_ext[:, :nloc], nlist)  # [nf, nloc, N_2, 4]
        if self.cfg.direct_dist:
            g2, h2 = safe_norm(diff) / self.cfg.rcut, diff / self.cfg.rcut
        else:
            g2, h2 = R[..., :1], R[..., 1:]
        g2 = self.act(self.g2_embd(g2))  # [nf, nloc, N_2, g2_dim]
        g1 = self.act(g1)
        # neighbour j (an extended index) -> the local atom whose features it carries
        idx = nlist.clamp(min=0)
        nei = idx if mapping is None else torch.gather(mapping, 1, idx.reshape(nf, -1)).reshape(nf, nloc, nnei)
        for layer in self.layers:
            g1, g2, h2 = layer(g1, g2, h2, nei, mask, sw)
        return g1, g2, h2, diff, sw


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
    mixed_types = True  # one shared fitting net

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
