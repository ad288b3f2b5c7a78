"""Tabulated embedding nets (DP-Compress, Lu et al., JCTC 18, 5559 (2022)): the tables and their evaluation.

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
linearly from the end value and slope, as deepmd-kit 3.2.0's kernel does (`locate_xx`).
Evaluation: the knot of each input comes from index arithmetic (floor((s - lower) / D)), the
polynomial from Horner's rule on gathered coefficient rows."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from lamflow.model.errors import ConfigError
from lamflow.model.nn.descriptor_config import SeE2AConfig
from lamflow.model.nn.env_mat import switch
from lamflow.model.schema import Strict


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
