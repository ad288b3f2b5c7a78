"""Model compression (DP-Compress, Lu et al., JCTC 18, 5559 (2022)): tabulated embedding nets.

Each se_e2_a embedding net maps one scalar, s = R^_ij[0], to M1 channels. Over the range of s the
data can produce it is replaced by piecewise quintic polynomials, one per interval and channel:

    G(s) = a0 + a1 d + a2 d^2 + a3 d^3 + a4 d^4 + a5 d^5,   d = s - x_l  for s in [x_l, x_l + D)
with the coefficients of the quintic Hermite interpolant of the net's value y, slope y' and
curvature y'' at both ends (h = y_{l+1} - y_l; deepmd-kit's utils/tabulate.py):
    a0 = y_l,  a1 = y'_l,  a2 = y''_l / 2
    a3 = [ 20h - (8 y'_{l+1} + 12 y'_l) D - (3 y''_l - y''_{l+1}) D^2] / (2 D^3)
    a4 = [-30h + (14 y'_{l+1} + 16 y'_l) D + (3 y''_l - 2 y''_{l+1}) D^2] / (2 D^4)
    a5 = [ 12h - 6 (y'_{l+1} + y'_l) D + (y''_{l+1} - y''_l) D^2] / (2 D^5)
so G, G' and G'' are continuous at every knot (forces stay smooth; error ~ D^6 y^(6)).

Range (deepmd-kit's `_get_env_mat_range`), per centre type t_i with mean/std of column 0:
    lower = floor(min_t -mean[t] / std[t])                        s of an empty slot / a neighbour at rcut
    upper = ceil(max_t (sw(r_min) / r_min - mean[t]) / std[t])    s of the closest pair in the data
(min over the centre types a table serves: all of them when type_one_side, else its own).
Table 1 covers [lower, upper) with stride D = `stride` (-s, 0.01); table 2 covers
[upper, extrapolate * upper) with stride 10 D (-e, 5). Beyond both ends G is extended
linearly from the end value and slope, as deepmd-kit 3.2.0's kernel does (`locate_xx`):
inputs outside the table cost accuracy, never a crash; `check_frequency` (-f) > 0 warns
about them every that many calls.

Evaluation (`TabulatedSeE2A`): the knot of each input comes from index arithmetic
(floor((s - lower) / D)), the polynomial from Horner's rule on gathered coefficient rows. The
fused path (`features`, used by `CompressedModel`) trims the empty slots at the end of each
type block (over the batch) and adds them analytically: every empty slot around a centre of
type t_i contributes R^_pad^T G(s_pad), R^_pad = -mean[t_i] / std[t_i], like a neighbour at
rcut. It goes from the extended coordinates to D in one custom autograd function
(`_FusedSeE2A`: env matrix, tables with G' = dG/ds from the derivative of Horner's recursion,
T_i = sum_j R^_ij^T G_ij, D_i = T_i^T T_i^<) whose backward is written out (the chain rule
through D, T, the tables and the env matrix, then the scatter onto the atoms, as deepmd-kit's
`prod_force_a`), over all centres at once (chunks only beyond 2^22 pairs x channels); the
typed tanh fitting nets get the same treatment (`_FusedFitting`). So a force evaluation is
a few dozen whole-tensor passes and two autograd nodes instead of an autograd graph of a few hundred
small ops; the nets are never run. Pure PyTorch: no compiled kernel (deepmd-kit's C++
`tabulate_fusion_se_a` does the table part in one loop). Not twice differentiable: compressed
models are for inference, not for training.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.errors import CheckpointError, ConfigError, DataError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint, resolve_device
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor.base import DescriptorOutput, EnvMatBlock
from lamflow.model.nn.descriptor_config import SeE2AConfig, dtype_name
from lamflow.model.nn.env_mat import switch
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.network import DTYPES
from lamflow.model.schema import Strict

# ----------------------------------------------------------------------------- configs


class TableGrid(Strict):
    """Knots of one table: lower + k D (k = 0..n0), then upper + k 10D (k = 1..n1)."""

    lower: float  # first knot
    n0: int = Field(ge=1)  # intervals of stride D: table 1 ends at upper = lower + n0 D
    n1: int = Field(ge=0)  # intervals of stride 10 D: table 2 ends at lower + n0 D + n1 10 D

    def knots(self, stride: float) -> np.ndarray:
        upper = self.lower + self.n0 * stride
        return np.concatenate([self.lower + stride * np.arange(self.n0 + 1), upper + 10 * stride * np.arange(1, self.n1 + 1)])

    @property
    def nrows(self) -> int:
        return self.n0 + self.n1 + 2  # intervals plus one linear row at each end


class CompressedModelConfig(Strict):
    """What a compressed checkpoint needs to rebuild itself: the original model config, the
    compression parameters and the knots of every table (one per embedding net)."""

    model: ModelConfig
    min_nbor_dist: float = Field(gt=0)  # Angstrom, the closest pair the tables were built for
    stride: float = Field(0.01, gt=0)  # D of table 1; table 2 uses 10 D
    extrapolate: float = Field(5.0, ge=1)
    check_frequency: int = -1  # warn about inputs outside the tables every N calls (-1: never)
    tables: list[TableGrid]

    @model_validator(mode="after")
    def _check(self):
        d = self.model.descriptor
        if not isinstance(d, SeE2AConfig):
            raise ValueError(f"compression supports se_e2_a only, got descriptor type {d.type!r}")
        nt = len(self.model.type_map)
        want = nt if d.type_one_side else nt * nt
        if len(self.tables) != want:
            raise ValueError(f"{want} tables expected (one per embedding net), got {len(self.tables)}")
        return self

    @property
    def dtype_name(self) -> str:
        return self.model.dtype_name


# ----------------------------------------------------------------------------- building tables


def net_derivatives(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y, y', y'' [K, M1] of a 1 -> M1 net at the points x [K] (forward-mode AD, float64)."""
    f = lambda t: net(t[:, None])  # noqa: E731
    one = torch.ones_like(x)
    with torch.no_grad():
        (y, dy), (_, d2y) = torch.func.jvp(lambda t: torch.func.jvp(f, (t,), (one,)), (x,), (one,))
    return y, dy, d2y


def hermite_coefficients(x: Tensor, y: Tensor, dy: Tensor, d2y: Tensor) -> Tensor:
    """Quintic Hermite coefficients [nint, 6, M] of the intervals between the knots x [nint + 1]."""
    D = (x[1:] - x[:-1])[:, None]  # [nint, 1]
    y0, y1, d0, d1, c0, c1 = y[:-1], y[1:], dy[:-1], dy[1:], d2y[:-1], d2y[1:]
    h = y1 - y0
    a3 = (20 * h - (8 * d1 + 12 * d0) * D - (3 * c0 - c1) * D**2) / (2 * D**3)
    a4 = (-30 * h + (14 * d1 + 16 * d0) * D + (3 * c0 - 2 * c1) * D**2) / (2 * D**4)
    a5 = (12 * h - 6 * (d1 + d0) * D + (c1 - c0) * D**2) / (2 * D**5)
    return torch.stack([y0, d0, 0.5 * c0, a3, a4, a5], dim=1)


def build_table(net: nn.Module, grid: TableGrid, stride: float) -> tuple[Tensor, Tensor]:
    """(coefficients [nrows, 6, M1], row start knots [nrows]) in float64: a linear row below
    lower, the quintic intervals, a linear row beyond the last knot."""
    net = copy.deepcopy(net).to(torch.float64)
    x = torch.as_tensor(grid.knots(stride), dtype=torch.float64)
    y, dy, d2y = net_derivatives(net, x)
    inner = hermite_coefficients(x, y, dy, d2y)  # [nint, 6, M1]
    lin = lambda k: torch.stack([y[k], dy[k]] + [torch.zeros_like(y[k])] * 4)[None]  # noqa: E731
    coef = torch.cat([lin(0), inner, lin(-1)])
    starts = torch.cat([x[:1], x[:-1], x[-1:]])
    return coef, starts


def table_grids(cfg: SeE2AConfig, mean: Tensor, std: Tensor, ntypes: int, min_nbor_dist: float, stride: float,
                extrapolate: float) -> list[TableGrid]:
    """deepmd-kit's range rule: per centre type, lower = -mean/std, upper = (sw(r_min)/r_min - mean)/std,
    floored / ceiled; a type_one_side table serves every centre type (min / max over them)."""
    m = mean[:, 0, 0].double()
    s = std[:, 0, 0].double()
    r = torch.tensor(min_nbor_dist, dtype=torch.float64)
    smax = (switch(r, cfg.rcut_smth, cfg.rcut) / r).item()
    lower = torch.floor(-m / s)  # [ntypes]
    upper = torch.ceil((smax - m) / s)  # [ntypes]
    grids = []
    for k in range(ntypes if cfg.type_one_side else ntypes * ntypes):
        lo, up = (lower.min().item(), upper.max().item()) if cfg.type_one_side else (lower[k // ntypes].item(), upper[k // ntypes].item())
        if up <= lo:
            raise ConfigError(f"table {k}: empty input range [{lo}, {up}] (statistics not set? min_nbor_dist {min_nbor_dist})")
        n0 = max(1, math.ceil((up - lo) / stride - 1e-6))
        top = lo + n0 * stride
        n1 = max(0, math.ceil((extrapolate * up - top) / (10 * stride) - 1e-6)) if extrapolate * up > top else 0
        grids.append(TableGrid(lower=lo, n0=n0, n1=n1))
    return grids


# ----------------------------------------------------------------------------- evaluating tables


def horner(coef: Tensor, rows: Tensor, d: Tensor) -> Tensor:
    """G [P, M] = sum_k coef[k, rows] d^k by Horner's rule (autograd-able); coef [6, R, M], rows [P], d [P, 1]."""
    G = coef[5].index_select(0, rows)
    for k in (4, 3, 2, 1, 0):
        G = torch.addcmul(coef[k].index_select(0, rows), G, d)
    return G


def horner_into(coef: Tensor, rows: Tensor, d: Tensor, G: Tensor, dG: Tensor | None, tmp: Tensor) -> None:
    """As horner, into preallocated G [P, M] (and dG/dd into dG), tmp [P, M] scratch; no autograd.
    The derivative runs one step behind the value: dG <- G_k + dG d after G_k <- c_k + G_{k+1} d."""
    if dG is None:
        torch.index_select(coef[5], 0, rows, out=G)
        for k in (4, 3, 2, 1, 0):
            torch.addcmul(torch.index_select(coef[k], 0, rows, out=tmp), G, d, out=G)
        return
    torch.index_select(coef[5], 0, rows, out=dG)  # c5 = dG after the first step's "one behind"
    torch.addcmul(torch.index_select(coef[4], 0, rows, out=tmp), dG, d, out=G)  # G = c4 + c5 d
    for k in (3, 2, 1, 0):
        torch.addcmul(G, dG, d, out=dG)
        torch.addcmul(torch.index_select(coef[k], 0, rows, out=tmp), G, d, out=G)


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
                tab: "TabulatedSeE2A", need_grad: bool) -> Tensor:
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


class TabulatedSeE2A(nn.Module):
    """se_e2_a with its embedding nets replaced by tables; same inputs and outputs as SeE2A."""

    mixed_types = False

    def __init__(self, cfg: SeE2AConfig, ntypes: int, grids: list[TableGrid], stride: float, check_frequency: int = -1):
        super().__init__()
        self.cfg, self.ntypes, self.stride = cfg, ntypes, stride
        self.sel = list(cfg.sel)
        self.nnei = sum(self.sel)
        self.sec = np.concatenate([[0], np.cumsum(self.sel)]).tolist()
        dtype = DTYPES[dtype_name(cfg.precision)]
        self.env = EnvMatBlock(cfg.rcut, cfg.rcut_smth, self.nnei, ntypes, dtype, cfg.env_protection, cfg.set_davg_zero)
        self.m1, self.m2 = cfg.neuron[-1], cfg.axis_neuron
        self.dim_out = self.m1 * self.m2
        self.grids = list(grids)
        nrows = [g.nrows for g in grids]
        offsets = np.concatenate([[0], np.cumsum(nrows)[:-1]])
        self.register_buffer("coef", torch.zeros(6, sum(nrows), self.m1, dtype=dtype))  # [6, rows, M1]
        starts = [np.concatenate([[g.lower], g.knots(stride)[:-1], g.knots(stride)[-1:]]) for g in grids]
        # geometry of each table (derived from the config, so not saved)
        self.register_buffer("starts", torch.as_tensor(np.concatenate(starts), dtype=dtype), persistent=False)
        self.register_buffer("t_offset", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("t_lower", torch.tensor([g.lower for g in grids], dtype=dtype), persistent=False)
        self.register_buffer("t_upper", torch.tensor([g.lower + g.n0 * stride for g in grids], dtype=dtype), persistent=False)
        self.register_buffer("t_n0", torch.tensor([g.n0 for g in grids], dtype=dtype), persistent=False)
        self.register_buffer("t_nint", torch.tensor([g.n0 + g.n1 for g in grids], dtype=dtype), persistent=False)
        self.register_buffer("t_max", torch.tensor([g.knots(stride)[-1] for g in grids], dtype=dtype), persistent=False)
        # table of each (centre type, slot): t_j, or t_i * ntypes + t_j
        tj = torch.repeat_interleave(torch.arange(ntypes), torch.tensor(self.sel))  # [nnei]
        tid = tj[None].expand(ntypes, -1) + (0 if cfg.type_one_side else torch.arange(ntypes)[:, None] * ntypes)
        self.register_buffer("slot_table", tid.contiguous(), persistent=False)  # [ntypes, nnei]
        self.check_frequency, self.calls = check_frequency, 0
        # MD guards (md.py) set count_range: every call then adds its inputs outside the tables to
        # out_of_range (a tensor, so counting never waits for the device); read it with int()
        self.count_range = False
        self.register_buffer("out_of_range", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("unit", torch.tensor([1.0, 0.0, 0.0], dtype=dtype), persistent=False)  # r_ij of empty slots
        self._slots = self._empty = None  # caches of _trim and empty_slots
        self.chunk_elems = 1 << 22  # pairs x channels per chunk of the fused path (32 MiB of float64 per [P, M1] term)
        self.requires_grad_(False)

    def nlist_requests(self) -> list[NlistRequest]:
        return [NlistRequest(self.cfg.rcut, tuple(self.sel), mixed=False)]

    # -- the table
    def locate(self, s: Tensor, tid: Tensor) -> Tensor:
        """Coefficient row of every input s (same shape as tid): linear rows beyond both ends."""
        lo, up = self.t_lower[tid], self.t_upper[tid]
        k = torch.where(s < up, torch.floor((s - lo) / self.stride), self.t_n0[tid] + torch.floor((s - up) / (10 * self.stride)))
        k = torch.minimum(k.clamp(min=-1.0), self.t_nint[tid])
        return self.t_offset[tid] + 1 + k.long()

    def table(self, s: Tensor, tid: Tensor) -> Tensor:
        """G(s) [..., M1] by plain autograd-able ops (reference path and empty slots)."""
        rows = self.locate(s, tid)
        d = (s - self.starts[rows]).reshape(-1, 1)
        return horner(self.coef, rows.reshape(-1), d).view(*s.shape, self.m1)

    # -- descriptor
    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> DescriptorOutput:
        """As SeE2A.forward (every slot evaluated, G materialised for the pair features)."""
        nlist = nlists[0]
        nloc = nlist.shape[1]
        atype = atype_ext[:, :nloc]
        R, diff, sw = self.env(coord_ext, atype, nlist)  # [nf, nloc, nnei, 4]
        G = self.table(R[..., 0], self.slot_table[atype.clamp(min=0)])  # [nf, nloc, nnei, M1]
        T = R.transpose(-1, -2) @ G / self.nnei  # [nf, nloc, 4, M1]
        D = T.transpose(-1, -2) @ T[..., : self.m2]  # [nf, nloc, M1, M2]
        return DescriptorOutput(D.flatten(-2), G, diff, sw, nlist)

    def features(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor]) -> Tensor:
        """D [nf, nloc, M1 * M2] by the fused path (_FusedSeE2A): trimmed slots, analytic forces."""
        nlist = nlists[0]
        nf, nloc, _ = nlist.shape
        nall = coord_ext.shape[1]
        keep, drop = self._trim(nlist)
        nl = nlist.index_select(2, keep).reshape(nf * nloc, -1)  # [B, nk], B = nf * nloc centres
        first = (torch.arange(nf, device=nl.device) * nall).repeat_interleave(nloc)  # [B] frame's first row in coord_ext
        i = first + torch.arange(nloc, device=nl.device).repeat(nf)  # [B] rows of the centres
        j = nl.clamp(min=0) + first[:, None]  # [B, nk] rows of the neighbours (empty slots: masked)
        t = atype_ext[:, :nloc].clamp(min=0).reshape(-1)  # [B]
        pad = self.empty_slots(drop) if drop.numel() else None  # [ntypes, 4, M1]
        need_grad = torch.is_grad_enabled() and coord_ext.requires_grad
        D = _FusedSeE2A.apply(coord_ext.reshape(nf * nall, 3), i, j, nl >= 0, t, keep, pad, self, need_grad)
        return D.view(nf, nloc, self.dim_out)

    @property
    def d_cols(self) -> int:
        """Columns of T^< in the D product: M2, widened to 8 when M1 allows (zero-padded in the
        backward). CPU batched matmuls whose inner sizes are all below 8 take a slow path (measured
        3-4x slower for 1000 x [16, 4] @ [4, 4] than for [16, 4] @ [4, 8]); the extra columns are sliced off."""
        return min(self.m1, max(self.m2, 8))

    def slot_stats(self, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mean, 1 / std [ntypes, nk, 4] and table ids [ntypes, nk] of the kept slots."""
        return self.env.mean[:, keep], 1.0 / self.env.stddev[:, keep], self.slot_table[:, keep]

    def pair_terms(self, x: Tensor, i: Tensor, j: Tensor, mask: Tensor, t: Tensor, stats: tuple, derivatives: bool) -> _PairTerms:
        """Env matrix, table values (and what the backward needs) of centres i [b] (rows of x) with
        neighbours j [b, nk] (mask: real neighbours, t: centre types [b])."""
        mean, istd, tids = stats
        rs, rc, prot = self.env.rcut_smth, self.env.rcut, self.env.protection
        diff = torch.where(mask[..., None], x[j] - x[i][:, None], self.unit)  # [b, nk, 3]; empty: no 0/0 anywhere
        r = torch.linalg.vector_norm(diff, dim=-1)  # [b, nk]
        u = ((r - rs) / (rc - rs)).clamp(0.0, 1.0)
        m = mask.to(x.dtype)
        inv = 1.0 / (r + prot)
        a = (u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0) * m * inv  # sw / r, 0 in empty slots
        b = a * inv  # sw / r^2
        ist = istd[t]  # [b, nk, 4]
        R = (torch.cat([a[..., None], diff * b[..., None]], dim=-1) - mean[t]) * ist  # [b, nk, 4]
        s = R[..., 0]
        rows = self.locate(s, tids[t]).reshape(-1)  # [P]
        d = (s.reshape(-1) - self.starts[rows])[:, None]  # [P, 1]
        G = x.new_empty(rows.numel(), self.m1)  # [P, M1]
        dG = torch.empty_like(G) if derivatives else None
        horner_into(self.coef, rows, d, G, dG, torch.empty_like(G))
        shape = (*j.shape, self.m1)
        if not derivatives:
            return _PairTerms(R, G.view(shape), None, None, None, None, None, None, None)
        dsw = u * u * (-30.0 * u * u + 60.0 * u - 30.0) * (m / (rc - rs))  # dsw/dr; 0 outside (rcut_smth, rcut)
        da, db = dsw * inv - a * inv, dsw * inv * inv - 2.0 * b * inv
        return _PairTerms(R, G.view(shape), dG.view(shape), diff, r, b, da, db, ist)

    def empty_slots(self, slots: Tensor) -> Tensor:
        """sum over the given (empty) slots of R^_pad^T G(s_pad), per centre type [ntypes, 4, M1]
        (kept from the last call while the slots, the tables and the statistics are unchanged)."""
        key = (tuple(slots.tolist()), slots.device, self.coef._version, self.env.mean._version, self.env.stddev._version,
               self.coef.dtype)
        if self._empty is None or self._empty[0] != key:
            self._empty = key, self._empty_slots(slots)
        return self._empty[1]

    def _empty_slots(self, slots: Tensor) -> Tensor:
        Rp = -self.env.mean[:, slots] / self.env.stddev[:, slots]  # [ntypes, n, 4]
        G = self.table(Rp[..., 0], self.slot_table[:, slots])  # [ntypes, n, M1]
        return Rp.transpose(1, 2) @ G

    def _trim(self, nlist: Tensor) -> tuple[Tensor, Tensor]:
        """Slots up to the last used one of each type block (over the batch), and the rest."""
        used = (nlist >= 0).reshape(-1, self.nnei).any(0).cpu().numpy() if nlist.numel() else np.zeros(self.nnei, bool)
        keep, drop = [], []
        for a, b in zip(self.sec[:-1], self.sec[1:]):
            hit = np.nonzero(used[a:b])[0]
            last = int(hit[-1]) + 1 if len(hit) else 0
            keep.append(np.arange(a, a + last))
            drop.append(np.arange(a + last, b))
        key = (tuple(np.concatenate(keep)), nlist.device)
        if self._slots is None or self._slots[0] != key:  # the same split call after call: build its tensors once
            self._slots = key, *(torch.as_tensor(np.concatenate(v), dtype=torch.long, device=nlist.device) for v in (keep, drop))
        return self._slots[1], self._slots[2]

    def outside_tables(self, s: Tensor, used: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        """[nf, nloc, nkeep] bool: real neighbours whose input s lies outside [lower, last knot] of
        its table (where G is extended linearly)."""
        tid = self.slot_table[:, keep][t]
        return used & ((s < self.t_lower[tid]) | (s > self.t_max[tid]))

    def range_check_due(self) -> bool:
        """Whether this call counts the inputs outside the tables (MD guards, or every
        check_frequency-th call)."""
        if self.check_frequency > 0:
            self.calls += 1
        return self.count_range or (self.check_frequency > 0 and self.calls % self.check_frequency == 0)

    def report_range(self, n_out: Tensor) -> None:
        """Add the count of this call to out_of_range (MD guards) and warn when the check is due."""
        if self.count_range:
            self.out_of_range += n_out
        if self.check_frequency > 0 and self.calls % self.check_frequency == 0 and int(n_out):
            warnings.warn(f"compressed model: {int(n_out)} neighbour inputs outside the tabulated range "
                          f"(closer than the min_nbor_dist the tables were built for?); extrapolating linearly", stacklevel=4)

    @classmethod
    def from_se_e2a(cls, desc, grids: list[TableGrid], stride: float, check_frequency: int = -1) -> "TabulatedSeE2A":
        """Tabulate the nets of a SeE2A (its statistics are copied)."""
        tab = cls(desc.cfg, desc.ntypes, grids, stride, check_frequency)
        tab.env.load_state_dict(desc.env.state_dict())
        coefs = [build_table(net, g, stride)[0] for net, g in zip(desc.nets, grids)]
        tab.coef.copy_(torch.cat(coefs).permute(1, 0, 2).to(tab.coef))
        return tab.to(desc.env.mean.device)


# ----------------------------------------------------------------------------- the model


class CompressedModel(nn.Module):
    """EnergyModel with a TabulatedSeE2A descriptor: same interface, checkpoint kind "compressed"."""

    kind = "compressed"

    def __init__(self, cfg: CompressedModelConfig):
        super().__init__()
        self.cfg = cfg
        self.type_map = list(cfg.model.type_map)
        ntypes = len(self.type_map)
        self.descriptor = TabulatedSeE2A(cfg.model.descriptor, ntypes, cfg.tables, cfg.stride, cfg.check_frequency)
        self.fitting = EnergyFitting(cfg.model.fitting_net, self.descriptor.dim_out, ntypes, mixed_types=False)
        self.register_buffer("out_bias", torch.zeros(ntypes, dtype=DTYPES[cfg.dtype_name]))
        self.requires_grad_(False)

    @classmethod
    def from_config(cls, config: dict) -> "CompressedModel":
        return cls(CompressedModelConfig.model_validate(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.out_bias.dtype

    def nlist_requests(self) -> list[NlistRequest]:
        return self.descriptor.nlist_requests()

    def atomic_energy(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> Tensor:
        nloc = nlists[0].shape[1]
        atype = atype_ext[:, :nloc]
        D = self.descriptor.features(coord_ext, atype_ext, nlists)
        t = atype.clamp(min=0)
        if not _fusable(self.fitting):
            return self.fitting(D, atype) + self.out_bias[t] * (atype >= 0)
        D = D.to(self.fitting.bias_atom_e.dtype)  # the fitting's own precision, as EnergyFitting does
        e = _FusedFitting.apply(D.reshape(-1, D.shape[-1]), t.reshape(-1), self.fitting).view(atype.shape)
        return (e + self.fitting.bias_atom_e[t] + self.out_bias[t]) * (atype >= 0)

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> Tensor:
        return self.atomic_energy(coord_ext, atype_ext, nlists, mapping)


def compress_model(model, min_nbor_dist: float, stride: float = 0.01, extrapolate: float = 5.0,
                   check_frequency: int = -1) -> CompressedModel:
    """Tabulate an se_e2_a EnergyModel (statistics must already be set)."""
    desc = model.descriptor
    if not isinstance(getattr(model.cfg, "descriptor", None), SeE2AConfig) or getattr(model, "kind", "") != "energy":
        what = getattr(getattr(model.cfg, "descriptor", None), "type", getattr(model, "kind", type(model).__name__))
        raise ConfigError(f"compression supports se_e2_a energy models only, got {what!r}")
    if not (stride > 0 and extrapolate >= 1 and min_nbor_dist > 0):
        raise ConfigError(f"compression needs stride > 0, extrapolate >= 1 and min_nbor_dist > 0 "
                          f"(got {stride}, {extrapolate}, {min_nbor_dist})")
    grids = table_grids(desc.cfg, desc.env.mean, desc.env.stddev, desc.ntypes, min_nbor_dist, stride, extrapolate)
    cfg = CompressedModelConfig(model=model.cfg, min_nbor_dist=min_nbor_dist, stride=stride, extrapolate=extrapolate,
                                check_frequency=check_frequency, tables=grids)
    out = CompressedModel(cfg).to(model.out_bias.device)
    out.descriptor = TabulatedSeE2A.from_se_e2a(desc, grids, stride, check_frequency)
    out.fitting.load_state_dict(model.fitting.state_dict())
    out.out_bias.copy_(model.out_bias)
    return out.eval()


# ----------------------------------------------------------------------------- entry point


@dataclass
class CompressResult:
    checkpoint: Path
    min_nbor_dist: float
    tables: int  # number of tables (embedding nets)
    rows: int  # polynomial rows over all tables
    seconds: float
    check: dict  # max |E_compressed - E| per atom and |F| difference on sample frames, when data was given


def resolve_min_nbor_dist(payload: dict, rcut: float, type_map: list[str], training_data: list[str] | str | None,
                          min_nbor_dist: float | None, fmt: str = "auto", log: Callable = print):
    """Explicit value, else from the data (a training config's training_data or system paths),
    else the value stored in the checkpoint; returns (distance, systems or None)."""
    systems = None
    if training_data:
        systems = _load_training_data(training_data, type_map, fmt)
    if min_nbor_dist is not None:
        return float(min_nbor_dist), systems
    if systems is not None:
        from lamflow.model.data.batch import min_neighbor_distance

        d = min_neighbor_distance(systems, rcut)
        if not math.isfinite(d):
            raise DataError(f"{training_data}: no pair of atoms closer than rcut {rcut}; give --min-nbor-dist")
        log(f"min_nbor_dist {d:.4f} A from {sum(s.nframes for s in systems)} frames")
        return d, systems
    if payload.get("min_nbor_dist"):
        return float(payload["min_nbor_dist"]), None
    raise ConfigError("min_nbor_dist unknown: the checkpoint does not store it; give the training data (-t DATA_OR_CONFIG) "
                      "or --min-nbor-dist")


def _load_training_data(spec: list[str] | str, type_map: list[str], fmt: str):
    from lamflow.model.data.systems import load_systems
    from lamflow.model.training.config import load_train_config

    paths = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if len(paths) == 1 and Path(paths[0]).is_file() and Path(paths[0]).suffix in (".yaml", ".yml", ".json"):
        cfg = load_train_config(paths[0])
        td = cfg.training.training_data
        return load_systems(td.system_list, type_map, td.fmt, labeled=False)
    return load_systems(paths, type_map, fmt, labeled=False)


def compress(model_path: str | os.PathLike, out_path: str | os.PathLike, *, stride: float = 0.01, extrapolate: float = 5.0,
             check_frequency: int = -1, training_data: list[str] | str | None = None, min_nbor_dist: float | None = None,
             fmt: str = "auto", device: str = "cpu", log: Callable = print) -> CompressResult:
    """`lamflow compress`: tabulate the se_e2_a model in model_path and save a "compressed" checkpoint.
    `device`: where the tables are built and checked ("auto": a GPU when there is one)."""
    t0 = time.time()
    payload = read_checkpoint(model_path)
    if payload.get("kind", "energy") != "energy":
        raise CheckpointError(f"{model_path}: a {payload.get('kind')!r} model; compression takes a single se_e2_a energy model")
    desc = payload["config"].get("descriptor", {})
    if desc.get("type") not in ("se_e2_a", "se_a"):
        raise ConfigError(f"{model_path}: compression supports se_e2_a only, this model's descriptor is {desc.get('type')!r}")
    if not (stride > 0 and extrapolate >= 1):
        raise ConfigError(f"stride must be > 0 and extrapolate >= 1 (got {stride}, {extrapolate})")
    d, systems = resolve_min_nbor_dist(payload, float(desc.get("rcut", 6.0)), payload["type_map"], training_data,
                                       min_nbor_dist, fmt, log)
    model = build_from_payload(payload, str(model_path)).to(resolve_device(device)).eval()
    cm = compress_model(model, d, stride, extrapolate, check_frequency)
    check = {}
    if systems:
        check = compare(model, cm, systems)
        log(f"check on {check['frames']} frames: max |dE| {check['max_abs_de_per_atom']:.2e} eV/atom, "
            f"max |dF| {check['max_abs_df']:.2e} eV/A")
    # the uncompressed model travels along (tensors only), so `lamflow export-deepmd` can hand deepmd-kit
    # the embedding nets themselves plus the settings for `dp compress`; coverage of the model it was made from
    parent = {k: v for k, v in payload.items() if k != "train_state"}
    kept = {k: payload[k] for k in ("trained_elements",) if k in payload}
    path = save_model(cm.cpu(), out_path, extra={"min_nbor_dist": d, "parent": parent, **kept})
    rows = cm.descriptor.coef.shape[1]
    log(f"compressed {len(cm.cfg.tables)} embedding nets into {rows} rows (stride {stride}, extrapolate {extrapolate}, "
        f"min_nbor_dist {d:.4f} A) -> {path}")
    return CompressResult(path, d, len(cm.cfg.tables), rows, time.time() - t0, check)


def compare(model, compressed, systems, frames_per_system: int = 2) -> dict:
    """Largest energy-per-atom and force differences between a model and its compressed form."""
    from lamflow.model.nn.infer import evaluate

    de, df, n = 0.0, 0.0, 0
    for s in systems:
        k = np.linspace(0, s.nframes - 1, min(frames_per_system, s.nframes)).round().astype(int)
        box = None if s.box is None else s.box[k]
        a = evaluate(model, s.coord[k], box, s.atype, virial=False)
        b = evaluate(compressed, s.coord[k], box, s.atype, virial=False)
        de = max(de, float(np.abs(a["energy"] - b["energy"]).max() / s.natoms))
        df = max(df, float(np.abs(a["force"] - b["force"]).max()))
        n += len(k)
    return {"frames": n, "max_abs_de_per_atom": de, "max_abs_df": df}
