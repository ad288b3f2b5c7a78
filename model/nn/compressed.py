"""A compressed model: se_e2_a with tabulated embedding nets (nn/tables.py: the tables and
their math), evaluated by the fused path (nn/fused.py) or, for reference, net by net.

Inputs outside the tables cost accuracy, never a crash; `check_frequency` (-f) > 0 warns about
them every that many calls. The fused path (`features`, used by `CompressedModel`) trims the
empty slots and adds them analytically (nn/fused.py)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor.base import DescriptorOutput, EnvMatBlock
from lamflow.model.nn.descriptor_config import SeE2AConfig, dtype_name
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.fused import _fusable, _FusedFitting, _FusedSeE2A, _PairTerms
from lamflow.model.nn.network import DTYPES
from lamflow.model.nn.tables import TableGrid, build_table, horner, horner_into
from lamflow.model.schema import Strict


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
