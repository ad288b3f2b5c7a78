"""Energy fitting: E_i = F_{t_i}(D_i) + bias[t_i]   (deepmd-kit's EnergyFittingNet + out_bias).

One net per atom type for typed descriptors (se_e2_a), one shared net for mixed-type ones
(DPA-1, DPA-2). Hidden layers follow the residual rule with a trainable timestep (resnet_dt),
the output layer is linear. `bias_atom_e` is deepmd-kit's fitting-level bias (kept for weight
import, zero for models trained here); the per-type energy bias fitted by least squares on
composition lives in the model (`out_bias`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lamflow.model.nn.config import FittingConfig
from lamflow.model.nn.descriptor_config import dtype_name
from lamflow.model.nn.network import DTYPES, FittingNet, make_generator


class EnergyFitting(nn.Module):
    def __init__(self, cfg: FittingConfig, dim_in: int, ntypes: int, mixed_types: bool):
        super().__init__()
        self.cfg, self.ntypes, self.mixed_types = cfg, ntypes, mixed_types
        dtype = DTYPES[dtype_name(cfg.precision)]
        g = make_generator(cfg.seed)
        nnets = 1 if mixed_types else ntypes
        self.nets = nn.ModuleList(
            FittingNet(dim_in, cfg.neuron, 1, cfg.activation_function, cfg.resnet_dt, dtype, g) for _ in range(nnets)
        )
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dtype=dtype))
        if not cfg.trainable:
            self.requires_grad_(False)

    def forward(self, D: Tensor, atype: Tensor) -> Tensor:
        """D [nf, nloc, dim], atype [nf, nloc] (-1 padding) -> atomic energy [nf, nloc] (0 on padding)."""
        t = atype.clamp(min=0)
        D = D.to(self.bias_atom_e.dtype)  # the fitting's own precision (deepmd-kit casts it too)
        if self.mixed_types:
            e = self.nets[0](D).squeeze(-1)
        else:
            e = D.new_zeros(atype.shape)
            for ti, net in enumerate(self.nets):
                m = atype == ti
                e = e.index_put((m,), net(D[m]).squeeze(-1))
        return (e + self.bias_atom_e[t]) * (atype >= 0)
