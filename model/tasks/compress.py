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
rcut. It contracts T_i = sum_j R^_ij^T G_ij atom chunk by atom chunk (a chunk's G is ~1 MiB and
stays in cache) into preallocated buffers. Forces come from autograd through the table: a
custom backward uses G' = dG/ds, computed with G in the forward by the derivative of Horner's
recursion and kept (up to 256 MiB; beyond that recomputed chunk by chunk in the backward).
Pure PyTorch: no compiled kernel, so every step is a pass over a [pairs, M1] tensor, where
deepmd-kit's C++ `tabulate_fusion_se_a` does all in one loop; the savings come from doing no
work for empty slots and from never running the nets.
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

from lamflow.model.io.checkpoint import read_checkpoint, build_from_payload, resolve_device
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor_config import SeE2AConfig, dtype_name
from lamflow.model.schema import Strict
from lamflow.model.nn.descriptor.base import DescriptorOutput, EnvMatBlock
from lamflow.model.nn.env_mat import switch
from lamflow.model.errors import CheckpointError, ConfigError, DataError
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.network import DTYPES
from lamflow.model.data.neighbor import NlistRequest

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


class _TabulatedContraction(torch.autograd.Function):
    """T[b] = sum_j R[b, j]^T G(R[b, j, 0]) for a tabulated G, chunk by chunk over b.
    R [B, N, 4]; rows [B, N] coefficient rows; starts [R] knot of each row; coef [6, R, M].
    When forces are wanted, the forward also keeps G and G' = dG/ds of every pair (while they fit
    in `keep_bytes`), so that the backward is two small matrix products per chunk; beyond that
    budget the backward recomputes them chunk by chunk."""

    keep_bytes = 256 << 20

    @staticmethod
    def forward(ctx, R: Tensor, rows: Tensor, starts: Tensor, coef: Tensor, chunk: int) -> Tensor:
        B, N, _ = R.shape
        M = coef.shape[-1]
        out = R.new_empty(B, 4, M)
        keep = R.requires_grad and 2 * B * N * M * R.element_size() <= _TabulatedContraction.keep_bytes
        G = R.new_empty(B if keep else min(chunk, B), N, M)
        dG = torch.empty_like(G) if keep else None
        tmp = R.new_empty(min(chunk, B) * N, M)
        for a in range(0, B, chunk):
            Rc, rc = R[a : a + chunk], rows[a : a + chunk]
            b = Rc.shape[0]
            Gc = G[a : a + b] if keep else G[:b]
            d = (Rc[..., 0] - starts[rc]).reshape(-1, 1)
            horner_into(coef, rc.reshape(-1), d, Gc.view(-1, M), None if dG is None else dG[a : a + b].view(-1, M), tmp[: b * N])
            torch.bmm(Rc.transpose(1, 2), Gc, out=out[a : a + b])
        ctx.save_for_backward(R, rows, starts, coef)
        ctx.chunk, ctx.kept = chunk, (G, dG) if keep else None
        return out

    @staticmethod
    def backward(ctx, gT: Tensor):
        R, rows, starts, coef = ctx.saved_tensors
        B, N, _ = R.shape
        M = coef.shape[-1]
        gR = torch.empty_like(R)
        if ctx.kept is None:
            G, dG = R.new_empty(min(ctx.chunk, B), N, M), R.new_empty(min(ctx.chunk, B), N, M)
            tmp = R.new_empty(min(ctx.chunk, B) * N, M)
        for a in range(0, B, ctx.chunk):
            Rc, gc = R[a : a + ctx.chunk], gT[a : a + ctx.chunk].transpose(1, 2)  # gc [b, M, 4]
            b = Rc.shape[0]
            if ctx.kept is not None:
                Gc, dGc = ctx.kept[0][a : a + b], ctx.kept[1][a : a + b]
            else:
                rc = rows[a : a + b]
                d = (Rc[..., 0] - starts[rc]).reshape(-1, 1)
                Gc, dGc = G[:b], dG[:b]
                horner_into(coef, rc.reshape(-1), d, Gc.view(-1, M), dGc.view(-1, M), tmp[: b * N])
            g = torch.bmm(Gc, gc)  # dE/dR [b, N, 4] through the R^T factor
            g[..., 0] += (torch.bmm(dGc, gc) * Rc).sum(-1)  # ... and through s = R[..., 0] inside G
            gR[a : a + b] = g
        ctx.kept = None
        return gR, None, None, None, None


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
        self.chunk_elems = 1 << 17  # pairs x channels per chunk of the fused path (~1 MiB of float64)
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
        """D [nf, nloc, M1 * M2] by the fused path: trimmed slots, chunked contraction."""
        R, rows, t, drop = self.inputs(coord_ext, atype_ext, nlists[0])
        T = self.contract(R, rows)  # [nf, nloc, 4, M1]
        if drop.numel():
            T = T + self.empty_slots(drop)[t]
        T = T / self.nnei
        return (T.transpose(-1, -2) @ T[..., : self.m2]).flatten(-2)  # [nf, nloc, M1 * M2]

    def inputs(self, coord_ext: Tensor, atype_ext: Tensor, nlist: Tensor):
        """R^ [nf, nloc, nkeep, 4] of the kept slots, their coefficient rows [nf, nloc, nkeep],
        the centre types [nf, nloc] and the trimmed (empty) slots."""
        nloc = nlist.shape[1]
        t = atype_ext[:, :nloc].clamp(min=0)  # [nf, nloc]
        keep, drop = self._trim(nlist)
        nl = nlist.index_select(2, keep)  # [nf, nloc, nkeep]
        R, _, _ = self.env.raw(coord_ext, nl)
        mean, std = self.env.mean[:, keep], self.env.stddev[:, keep]  # [ntypes, nkeep, 4]
        R = (R - mean[t]) / std[t]  # [nf, nloc, nkeep, 4]
        self._check_range(R[..., 0], nl >= 0, t, keep)
        rows = self.locate(R[..., 0], self.slot_table[:, keep][t])  # [nf, nloc, nkeep]
        return R, rows, t, drop

    def contract(self, R: Tensor, rows: Tensor) -> Tensor:
        """sum_j R^_j^T G(s_j) [nf, nloc, 4, M1] (no 1/N_c), chunk by chunk over atoms."""
        nf, nloc, nk, _ = R.shape
        chunk = max(1, self.chunk_elems // max(1, nk * self.m1))
        T = _TabulatedContraction.apply(R.reshape(nf * nloc, nk, 4), rows.reshape(nf * nloc, nk), self.starts, self.coef, chunk)
        return T.view(nf, nloc, 4, self.m1)

    def empty_slots(self, slots: Tensor) -> Tensor:
        """sum over the given (empty) slots of R^_pad^T G(s_pad), per centre type [ntypes, 4, M1]."""
        Rp = -self.env.mean[:, slots] / self.env.stddev[:, slots]  # [ntypes, n, 4]
        G = self.table(Rp[..., 0], self.slot_table[:, slots])  # [ntypes, n, M1]
        return Rp.transpose(1, 2) @ G

    def _trim(self, nlist: Tensor) -> tuple[Tensor, Tensor]:
        """Slots up to the last used one of each type block (over the batch), and the rest."""
        used = nlist >= 0
        keep, drop = [], []
        for a, b in zip(self.sec[:-1], self.sec[1:]):
            pos = torch.arange(1, b - a + 1, device=nlist.device)
            last = int((used[..., a:b] * pos).amax()) if b > a and used.numel() else 0
            keep.append(torch.arange(a, a + last, device=nlist.device))
            drop.append(torch.arange(a + last, b, device=nlist.device))
        return torch.cat(keep), torch.cat(drop)

    def outside_tables(self, s: Tensor, used: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        """[nf, nloc, nkeep] bool: real neighbours whose input s lies outside [lower, last knot] of
        its table (where G is extended linearly)."""
        tid = self.slot_table[:, keep][t]
        return used & ((s < self.t_lower[tid]) | (s > self.t_max[tid]))

    def _check_range(self, s: Tensor, used: Tensor, t: Tensor, keep: Tensor) -> None:
        if self.count_range:
            self.out_of_range += self.outside_tables(s.detach(), used, t, keep).sum()
        if self.check_frequency <= 0:
            return
        self.calls += 1
        if self.calls % self.check_frequency:
            return
        tid = self.slot_table[:, keep][t]
        out = used & ((s < self.t_lower[tid]) | (s > self.t_max[tid]))
        if out.any():
            warnings.warn(f"compressed model: {int(out.sum())} neighbour inputs outside the tabulated range "
                          f"(closer than the min_nbor_dist the tables were built for?); extrapolating linearly", stacklevel=3)

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
        return self.fitting(D, atype) + self.out_bias[atype.clamp(min=0)] * (atype >= 0)

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
    from lamflow.model.training.config import load_train_config
    from lamflow.model.data.systems import load_systems

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
