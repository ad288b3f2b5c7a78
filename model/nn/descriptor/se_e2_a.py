"""se_e2_a: smooth two-body embedding descriptor (DeepPot-SE, Zhang et al., NeurIPS 2018).

For centre i with neighbours j in typed blocks (block t holds sel[t] slots, N_c = sum(sel)):
    R^_ij  = normalised env matrix row (see env_mat.py)                       [nnei, 4]
    G_ij   = N_{t_j}(R^_ij[0])  (type_one_side)   or  N_{t_i, t_j}(R^_ij[0])   [nnei, M1]
    T_i    = (1/N_c) sum_j R^_ij^T G_ij                                         [4, M1]
    D_i    = T_i^T T_i[:, :M2]     flattened                                    [M1 * M2]
Rotations cancel in T^T T, permutations of like atoms in the sum over j, and a neighbour at
rcut is identical to an empty slot, so D is smooth. Empty slots still contribute
G(R^_pad) R^_pad^T with R^_pad = -mean/std (zero when the mean is zero), exactly as deepmd-kit.
Embedding nets follow deepmd-kit's residual convention (network.py); N_c is the fixed
sum(sel), never the real neighbour count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lamflow.model.data.batch import auto_sel
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.descriptor.base import Descriptor, DescriptorOutput, EnvMatBlock
from lamflow.model.nn.descriptor_config import SeE2AConfig, dtype_name
from lamflow.model.nn.network import DTYPES, EmbeddingNet, make_generator


class SeE2A(Descriptor, config=SeE2AConfig):

    def __init__(self, cfg: SeE2AConfig, ntypes: int):
        super().__init__()
        if not isinstance(cfg.sel, list) or len(cfg.sel) != ntypes:
            raise ValueError(f"se_e2_a sel must list one count per type ({ntypes}), got {cfg.sel!r}")
        self.cfg, self.ntypes = cfg, ntypes
        self.sel = list(cfg.sel)
        self.nnei = sum(self.sel)
        self.sec = [0]
        for s in self.sel:
            self.sec.append(self.sec[-1] + s)
        dtype = DTYPES[dtype_name(cfg.precision)]
        g = make_generator(cfg.seed)
        self.env = EnvMatBlock(cfg.rcut, cfg.rcut_smth, self.nnei, ntypes, dtype, cfg.env_protection, cfg.set_davg_zero)
        nnets = ntypes if cfg.type_one_side else ntypes * ntypes  # index: t_j, or t_i * ntypes + t_j
        self.nets = nn.ModuleList(
            EmbeddingNet(1, cfg.neuron, cfg.activation_function, cfg.resnet_dt, dtype, g) for _ in range(nnets)
        )
        self.m1, self.m2 = cfg.neuron[-1], cfg.axis_neuron
        self.dim_out = self.m1 * self.m2
        if not cfg.trainable:
            self.requires_grad_(False)

    def nlist_requests(self) -> list[NlistRequest]:
        return [NlistRequest(self.cfg.rcut, tuple(self.sel), mixed=False)]

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> DescriptorOutput:
        nlist = nlists[0]
        nf, nloc, nnei = nlist.shape
        atype = atype_ext[:, :nloc]
        R, diff, sw = self.env(coord_ext, atype, nlist)  # [nf, nloc, nnei, 4]
        G = self.embed(R[..., 0], nlist >= 0, atype)  # [nf, nloc, nnei, M1]
        T = R.transpose(-1, -2) @ G / self.nnei  # [nf, nloc, 4, M1]
        D = T.transpose(-1, -2) @ T[..., : self.m2]  # [nf, nloc, M1, M2]
        return DescriptorOutput(D.flatten(-2), G, diff, sw, nlist)

    def net(self, ti: int, tj: int) -> EmbeddingNet:
        return self.nets[tj] if self.cfg.type_one_side else self.nets[ti * self.ntypes + tj]

    def embed(self, s: Tensor, mask: Tensor, atype: Tensor) -> Tensor:
        """G_ij = N(s_ij) for every slot. The nets run on real neighbours only: every empty slot
        of block t_j around a centre of type t_i has the same input -mean/std, so its embedding is
        computed once per (t_i, t_j) (exact when the statistics are tiled over the slots of a
        block, as they are when computed from data; otherwise all slots are evaluated)."""
        nt, m1 = self.ntypes, self.m1
        t = atype.clamp(min=0)
        tiled = self._stats_tiled()
        blocks = []
        for tj, (s_b, m_b) in enumerate(zip(s.split(self.sel, dim=2), mask.split(self.sel, dim=2))):
            if not tiled:
                G_b = s_b.new_zeros(*s_b.shape, m1)
                for ti in range(nt):
                    sel_i = atype == ti
                    G_b = G_b.index_put((sel_i,), self.net(ti, tj)(s_b[sel_i].unsqueeze(-1)))
                blocks.append(G_b)
                continue
            off = self.sec[tj]
            s_pad = -self.env.mean[:, off, 0] / self.env.stddev[:, off, 0]  # [ntypes] empty-slot input per centre type
            G_pad = torch.cat([self.net(ti, tj)(s_pad[ti].reshape(1, 1)) for ti in range(nt)])  # [ntypes, M1]
            G_b = G_pad[t][:, :, None, :].expand(*s_b.shape, m1).clone()  # [nf, nloc, sel_t, M1]
            if self.cfg.type_one_side:
                G_b[m_b] = self.nets[tj](s_b[m_b].unsqueeze(-1))
            else:
                for ti in range(nt):
                    mm = m_b & (atype == ti).unsqueeze(-1)
                    G_b[mm] = self.net(ti, tj)(s_b[mm].unsqueeze(-1))
            blocks.append(G_b)
        return torch.cat(blocks, dim=2)

    def _stats_tiled(self) -> bool:
        m, s = self.env.mean[..., 0], self.env.stddev[..., 0]  # [ntypes, nnei]
        return all(bool((m[:, a:b] == m[:, a : a + 1]).all() and (s[:, a:b] == s[:, a : a + 1]).all())
                   for a, b in zip(self.sec[:-1], self.sec[1:]) if b > a)

    @staticmethod
    def resolve_sel(cfg: SeE2AConfig, counter):
        """sel "auto"/"auto:r" -> per-type max neighbour counts * r; an explicit list is checked for length."""
        if isinstance(cfg.sel, str):
            ratio = 1.1 if cfg.sel == "auto" else float(cfg.sel.split(":")[1])
            per_type, _ = counter(cfg.rcut)
            return cfg.model_copy(update={"sel": auto_sel(per_type, ratio)})
        return cfg

    def set_stats(self, samples, protect: float = 1e-2) -> None:
        self.env.set_stats(samples, protect)
