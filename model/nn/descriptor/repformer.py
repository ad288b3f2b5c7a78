"""DPA-2's repformer blocks (the update of g1, g2, h2 layer by layer; the math is in dpa2.py's
docstring) and the small layers they are made of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamflow.model.nn.descriptor.base import EnvMatBlock
from lamflow.model.nn.descriptor_config import RepformerConfig
from lamflow.model.nn.env_mat import gather_neighbors
from lamflow.model.nn.network import ACTIVATIONS, Layer

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


def safe_norm(x: Tensor) -> Tensor:
    """|x| over the last axis with a zero gradient at x = 0 (empty slots). [..., 1]"""
    nonzero = (x * x).sum(-1, keepdim=True) > 0
    safe = torch.where(nonzero, x, torch.ones_like(x))
    return torch.where(nonzero, torch.linalg.vector_norm(safe, dim=-1, keepdim=True), torch.zeros_like(nonzero, dtype=x.dtype))
