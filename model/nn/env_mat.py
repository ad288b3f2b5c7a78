"""Smooth environment matrix (deepmd-kit's `prod_env_mat`) and its statistics.

For centre i and neighbour j (extended index from the neighbour list), r_ij = r_j - r_i, r = |r_ij|:
    u     = clamp((r - rcut_smth) / (rcut - rcut_smth), 0, 1)
    sw(r) = u^3 (-6 u^2 + 15 u - 10) + 1            1 below rcut_smth, 0 at rcut, C2-smooth
    R_ij  = sw(r) * (1/r, x/r^2, y/r^2, z/r^2)      = s(r) (1, x/r, y/r, z/r) with s = sw/r
    R^_ij = (R_ij - mean[t_i]) / std[t_i]           per centre type (and slot; stats are tiled)
Empty slots have R_ij = 0 before normalising, exactly like a neighbour at rcut: so the descriptor
is unchanged when a neighbour leaves the sphere (smoothness) and the 1/N_c sums use the fixed
N_c = sum(sel). Statistics pool all slots, empty ones included (deepmd-kit's EnvMatStatSe):
mean = (E[s], 0, 0, 0), std = (std(s), std(a), std(a), std(a)) with a pooled over the three
angular columns, each floored at `protect` (1e-2); a type without data gets mean 0, std 0.1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch(r: Tensor, rcut_smth: float, rcut: float) -> Tensor:
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


def gather_neighbors(x_ext: Tensor, nlist: Tensor) -> Tensor:
    """x_ext [nf, nall, d], nlist [nf, nloc, nnei] -> [nf, nloc, nnei, d] (empty slots read atom 0)."""
    nf, nloc, nnei = nlist.shape
    idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(-1, -1, x_ext.shape[-1])
    return torch.gather(x_ext, 1, idx).reshape(nf, nloc, nnei, x_ext.shape[-1])


def env_mat(coord_ext: Tensor, nlist: Tensor, rcut_smth: float, rcut: float, protection: float = 0.0):
    """Raw (un-normalised) R [nf, nloc, nnei, 4], r_ij [nf, nloc, nnei, 3] and sw [nf, nloc, nnei]."""
    nloc = nlist.shape[1]
    mask = nlist >= 0  # [nf, nloc, nnei]
    diff = gather_neighbors(coord_ext, nlist) - coord_ext[:, :nloc, None, :]  # [nf, nloc, nnei, 3]
    # empty slots get a harmless unit vector so that no 0/0 appears in any derivative
    unit = torch.zeros_like(diff)
    unit[..., 0] = 1.0
    diff = torch.where(mask[..., None], diff, unit)
    r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)  # [nf, nloc, nnei, 1]
    sw = switch(r, rcut_smth, rcut) * mask[..., None]
    inv = 1.0 / (r + protection)
    R = torch.cat([inv, diff * inv * inv], dim=-1) * sw  # [nf, nloc, nnei, 4]
    return R, diff * mask[..., None], sw.squeeze(-1)


class EnvStat:
    """Accumulates per-centre-type sums of the raw env matrix over frames."""

    def __init__(self, ntypes: int):
        self.n = torch.zeros(ntypes, 2, dtype=torch.float64)
        self.s = torch.zeros(ntypes, 2, dtype=torch.float64)
        self.s2 = torch.zeros(ntypes, 2, dtype=torch.float64)

    def add(self, R: Tensor, atype: Tensor) -> None:
        """R [nf, nloc, nnei, 4] raw env matrix; atype [nf, nloc] (-1 = padding, ignored)."""
        R = R.detach().double()
        for t in range(self.n.shape[0]):
            rows = R[atype == t]  # [n_t, nnei, 4]
            for c, cols in enumerate((rows[..., :1], rows[..., 1:])):
                self.n[t, c] += cols.numel()
                self.s[t, c] += cols.sum()
                self.s2[t, c] += (cols * cols).sum()

    def mean_std(self, nnei: int, protect: float = 1e-2, set_davg_zero: bool = False):
        """mean, std each [ntypes, nnei, 4] (tiled over slots)."""
        nt = self.n.shape[0]
        n = self.n.clamp(min=1)
        avg = torch.where(self.n > 0, self.s / n, torch.zeros_like(n))
        var = (self.s2 / n - avg * avg).clamp(min=0)
        std = torch.where(self.n > 0, var.sqrt(), torch.full_like(n, 0.1))
        std = torch.where(std.abs() < protect, torch.full_like(std, protect), std)
        mean = torch.zeros(nt, 4, dtype=torch.float64)
        if not set_davg_zero:
            mean[:, 0] = avg[:, 0]
        stdv = torch.stack([std[:, 0], std[:, 1], std[:, 1], std[:, 1]], dim=-1)
        return mean[:, None, :].expand(nt, nnei, 4).clone(), stdv[:, None, :].expand(nt, nnei, 4).clone()
