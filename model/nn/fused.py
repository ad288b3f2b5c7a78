"""The fused evaluation of a compressed model (nn/compressed.py) with its backward written out.

`_FusedSeE2A` goes from the extended coordinates to D in one custom autograd function: env
matrix, tables with G' = dG/ds from the derivative of Horner's recursion (nn/tables.py),
T_i = sum_j R^_ij^T G_ij, D_i = T_i^T T_i^<; its backward is the chain rule through D, T, the
tables and the env matrix, then the scatter onto the atoms (as deepmd-kit's `prod_force_a`),
over all centres at once (chunks only beyond 2^22 pairs x channels). The typed tanh fitting nets
get the same treatment (`_FusedFitting`). Empty slots at the end of each type block are trimmed
(over the batch) and added analytically: every empty slot around a centre of type t_i
contributes R^_pad^T G(s_pad), R^_pad = -mean[t_i] / std[t_i], like a neighbour at rcut. So a
force evaluation is a few dozen whole-tensor passes and two autograd nodes instead of an
autograd graph of a few hundred small ops. Pure PyTorch: no compiled kernel. Not twice
differentiable: compressed models are for inference, not for training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lamflow.model.nn.fitting import EnergyFitting


@dataclass
class _PairTerms:
    """Per-pair terms of B centres x nk slots, forward and backward of the fused path."""

    R: Tensor  # [B, nk, 4]   normalised env matrix R^
    G: Tensor  # [B, nk, M1]  table value G(s), s = R^[..., 0]
    dG: Tensor | None  # [B, nk, M1]  dG/ds (None: no forces wanted)
    diff: Tensor | None  # [B, nk, 3]  r_ij (a unit vector in empty slots)
    r: Tensor | None  # [B, nk]
    b: Tensor | None  # [B, nk]  sw / r^2, so R_raw[1:] = b r_ij; zero in empty slots
    da: Tensor | None  # [B, nk]  d(sw / r)/dr
    db: Tensor | None  # [B, nk]  d(sw / r^2)/dr
    istd: Tensor | None  # [B, nk, 4]  1 / std of the centre's type


def _contract(R: Tensor, G: Tensor, out: Tensor) -> Tensor:
    """out [b, 4, M1] = R^T G for R [b, nk, 4], G [b, nk, M1]. Below 8 slots both are zero-padded
    to 8: CPU batched matmuls with an inner size below 8 take a slow path (measured ~4x slower for
    1000 x [4, 5] @ [5, 16] than for [4, 8] @ [8, 16], the copies included)."""
    b, nk, M = G.shape
    if nk >= 8 or R.device.type != "cpu":
        return torch.bmm(R.transpose(1, 2), G, out=out)
    Rp, Gp = R.new_zeros(b, 4, 8), G.new_zeros(b, 8, M)
    Rp[:, :, :nk] = R.transpose(1, 2)
    Gp[:, :nk] = G
    return torch.bmm(Rp, Gp, out=out)


class _FusedSeE2A(torch.autograd.Function):
    """D [B, M1 * M2] of B centres straight from the (flattened) extended coordinates x, with an
    analytic backward: what deepmd-kit's C++ `prod_env_mat_a` + `tabulate_fusion_se_a` +
    `prod_force_a` do, written as a handful of whole-tensor passes instead of an autograd graph
    of ~60 small ops. For the pairs (i, j) of the kept slots, with a(r) = sw(r) / r, b(r) = sw(r) / r^2:
        R_raw = (a, b r_ij),  R^ = (R_raw - mean[t_i]) istd[t_i],  G = G(R^_0),  T_i = sum_j R^_ij^T G_ij
        T_i = (T_i + sum over empty slots) / N_c,   D_i = T_i^T T_i^<
    backward, from g_D:
        g_T  = T^< g_D^T + [g_D^T T]^<                    (^<: the first M2 columns / rows)
        g_R^ = G g_T^T,  g_R^_0 += sum_m (R^ g_T)_m G'_m   (G' = dG/ds, the quintic's derivative)
        g_R  = g_R^ istd,  g_r_ij = b g_R[1:] + (a' g_R0 + b' g_R[1:] . r_ij) r_ij / r
        g_x[j] += g_r_ij,  g_x[i] -= sum_j g_r_ij
    The centres go in chunks of `chunk_elems` pairs x channels (one chunk for a few thousand
    atoms); the pair terms are kept for the backward while they fit in `keep_bytes`, else
    recomputed chunk by chunk. Not twice differentiable (no training through the tables)."""

    keep_bytes = 256 << 20

    @staticmethod
    def forward(ctx, x: Tensor, i: Tensor, j: Tensor, mask: Tensor, t: Tensor, keep: Tensor, pad: Tensor | None,
                tab: nn.Module, need_grad: bool) -> Tensor:  # tab: the TabulatedSeE2A (nn/compressed.py) it serves
        B, nk = j.shape
        M, n2 = tab.m1, tab.d_cols
        chunk = max(1, tab.chunk_elems // max(1, nk * M))
        per_pair = (2 * M + 16) * x.element_size()
        kept = need_grad and B * nk * per_pair <= _FusedSeE2A.keep_bytes
        stats = tab.slot_stats(keep)
        check = tab.range_check_due()
        n_out = torch.zeros((), dtype=torch.long, device=x.device)
        T = x.new_empty(B, 4, M)
        terms = []
        for a in range(0, B, chunk):
            sl = slice(a, a + chunk)
            p = tab.pair_terms(x, i[sl], j[sl], mask[sl], t[sl], stats, need_grad)
            _contract(p.R, p.G, out=T[sl])  # [b, 4, M1]
            if check:
                n_out += tab.outside_tables(p.R[..., 0], mask[sl], t[sl], keep).sum()
            if kept:
                terms.append(p)
        if check:
            tab.report_range(n_out)
        if pad is not None:
            T += pad[t]  # the trimmed empty slots, per centre type
        T /= tab.nnei
        D = torch.bmm(T.transpose(1, 2), T[:, :, :n2])  # [B, M1, n2]
        if need_grad:
            ctx.save_for_backward(x, i, j, mask, t, keep, T)
            ctx.tab, ctx.chunk, ctx.terms = tab, chunk, terms if kept else None
        return D[..., : tab.m2].reshape(B, M * tab.m2)

    @staticmethod
    @once_differentiable
    def backward(ctx, gD: Tensor):
        x, i, j, mask, t, keep, T = ctx.saved_tensors
        tab = ctx.tab
        B, nk = j.shape
        M, M2, n2 = tab.m1, tab.m2, tab.d_cols
        g = gD.new_zeros(B, M, n2)
        g[..., :M2] = gD.view(B, M, M2)  # zero-padded to n2 columns (see d_cols)
        gT = torch.bmm(T[:, :, :n2], g.transpose(1, 2))  # [B, 4, M1]
        gT[:, :, :n2] += torch.bmm(T, g)
        gT /= tab.nnei
        stats = tab.slot_stats(keep) if ctx.terms is None else None
        gx = torch.zeros_like(x)
        for k, a in enumerate(range(0, B, ctx.chunk)):
            sl = slice(a, a + ctx.chunk)
            p = ctx.terms[k] if ctx.terms is not None else tab.pair_terms(x, i[sl], j[sl], mask[sl], t[sl], stats, True)
            gc = gT[sl]  # [b, 4, M1]
            gR = torch.bmm(p.G, gc.transpose(1, 2))  # [b, nk, 4] through the R^T factor
            gR[..., 0] += (torch.bmm(p.dG, gc.transpose(1, 2)) * p.R).sum(-1)  # ... and through s inside G
            gR *= p.istd
            radial = (gR[..., 0] * p.da + (gR[..., 1:] * p.diff).sum(-1) * p.db) / p.r  # [b, nk]
            gd = p.b[..., None] * gR[..., 1:] + radial[..., None] * p.diff  # [b, nk, 3] dE/dr_ij
            gx.index_add_(0, j[sl].reshape(-1), gd.reshape(-1, 3))
            gx.index_add_(0, i[sl], -gd.sum(1))
        return gx, None, None, None, None, None, None, None, None


class _FusedFitting(torch.autograd.Function):
    """Atomic energies [B] of the typed fitting nets (tanh / linear layers) on D [B, dim], with the
    backward written out (g_z = g_y idt (1 - tanh(z)^2), g_x = g_z W^T + residual): the autograd
    graph of the nets, split by type with boolean indexing, costs more than their matmuls on
    ~1000 atoms. The bias and the padding mask are added by the caller."""

    @staticmethod
    def forward(ctx, D: Tensor, t: Tensor, fitting: EnergyFitting) -> Tensor:
        e = D.new_zeros(D.shape[0])
        saved = []
        for ti, net in enumerate(fitting.nets):
            idx = (t == ti).nonzero().squeeze(1)
            x = D.index_select(0, idx)
            acts = []
            for layer in [*net.hidden.layers, net.out]:
                y = torch.addmm(layer.bias, x, layer.matrix) if layer.bias is not None else x @ layer.matrix
                if layer.act_name == "tanh":
                    y = torch.tanh(y)
                acts.append((x, y))  # layer input, activation output (before idt and the residual)
                x = _residual(layer, y * layer.idt if layer.idt is not None else y, x)
            e.index_copy_(0, idx, x.squeeze(-1))
            saved.append((idx, acts))
        ctx.fitting, ctx.saved, ctx.shape = fitting, saved, D.shape
        return e

    @staticmethod
    @once_differentiable
    def backward(ctx, ge: Tensor):
        gD = ge.new_zeros(ctx.shape)
        for (idx, acts), net in zip(ctx.saved, ctx.fitting.nets):
            g = ge.index_select(0, idx)[:, None]  # [n, 1]
            for layer, (x, y) in zip(reversed([*net.hidden.layers, net.out]), reversed(acts)):
                gres = _residual_grad(layer, g)  # through y + x (or y + [x, x])
                if layer.idt is not None:
                    g = g * layer.idt
                if layer.act_name == "tanh":
                    g = g * (1.0 - y * y)
                g = torch.addmm(gres, g, layer.matrix.T) if gres is not None else g @ layer.matrix.T
            gD.index_copy_(0, idx, g)
        return gD, None, None


def _residual(layer, y: Tensor, x: Tensor) -> Tensor:
    if layer.resnet and layer.n_out == layer.n_in:
        return y + x
    if layer.resnet and layer.n_out == 2 * layer.n_in:
        return y + torch.cat([x, x], dim=-1)
    return y


def _residual_grad(layer, g: Tensor) -> Tensor | None:
    if layer.resnet and layer.n_out == layer.n_in:
        return g
    if layer.resnet and layer.n_out == 2 * layer.n_in:
        return g[:, : layer.n_in] + g[:, layer.n_in :]
    return None


def _fusable(fitting: EnergyFitting) -> bool:
    """Typed nets of tanh / linear layers only (the analytic backward knows no other activation)."""
    return not fitting.mixed_types and all(layer.act_name in ("tanh", "linear", "none")
                                           for net in fitting.nets for layer in [*net.hidden.layers, net.out])
