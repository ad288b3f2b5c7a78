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

from ..config import SeE2AConfig, dtype_name
from ..network import DTYPES, EmbeddingNet, make_generator
from ..data import auto_sel
from ..neighbor import NlistRequest
from .base import DescriptorOutput, EnvMatBlock


class SeE2A(nn.Module):
    mixed_types = False  # one fitting net per atom type

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

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor]) -> DescriptorOutput:
        nlist = nlists[0]
        nf, nloc, nnei = nlist.shape
        atype = atype_ext[:, :nloc]
        R, diff, sw = self.env(coord_ext, atype, nlist)  # [nf, nloc, nnei, 4]
        T = R.new_zeros(nf, nloc, 4, self.m1)
        G_all = []
        for tj in range(self.ntypes):
            Rb = R[:, :, self.sec[tj] : self.sec[tj + 1]]  # [nf, nloc, sel_t, 4]
            if self.cfg.type_one_side:
                G = self.nets[tj](Rb[..., :1])  # [nf, nloc, sel_t, M1]
            else:
                G = Rb.new_zeros(*Rb.shape[:3], self.m1)
                for ti in range(self.ntypes):
                    m = atype == ti
                    G = G.index_put((m,), self.nets[ti * self.ntypes + tj](Rb[m][..., :1]))
            T = T + Rb.transpose(-1, -2) @ G  # [nf, nloc, 4, M1]
            G_all.append(G)
        T = T / self.nnei
        D = T.transpose(-1, -2) @ T[..., : self.m2]  # [nf, nloc, M1, M2]
        return DescriptorOutput(D.flatten(-2), torch.cat(G_all, dim=2), diff, sw, nlist)

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
