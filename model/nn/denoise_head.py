"""The denoise head (training/denoise.py: the corruption, the loss and the math):
    w_ij  = sw(r_ij) MLP_w(G_ij, D_i),   dx_i = sum_j w_ij r_ij / (sum_j sw(r_ij) + eps),   p_i = softmax(MLP_t(D_i))
and the MASK pseudo-type a type-masking model appends to its type map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lamflow.model.nn.config import DenoiseNetConfig
from lamflow.model.nn.network import DTYPES, FittingNet, make_generator


class DenoiseHead(nn.Module):
    """Equivariant displacement and masked-type logits from one descriptor output."""

    def __init__(self, cfg: DenoiseNetConfig, dim_descrpt: int, dim_pair: int, ntypes: int, dtype: torch.dtype):
        super().__init__()
        g = make_generator(cfg.seed)
        act, width = cfg.activation_function, cfg.neuron
        self.pair_weight = FittingNet(dim_pair + dim_descrpt, width, 1, act, False, dtype, g)  # MLP_w
        self.type_logits = FittingNet(dim_descrpt, width, ntypes, act, False, dtype, g)  # MLP_t
        with torch.no_grad():  # start from "no displacement, uniform types": the trivial denoiser
            for net in (self.pair_weight, self.type_logits):
                net.out.matrix.zero_()
                net.out.bias.zero_()

    def forward(self, d, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """d: DescriptorOutput. Returns dx [nf, nloc, 3] and logits [nf, nloc, ntypes]."""
        D_i = d.descriptor.unsqueeze(2).expand(-1, -1, d.pair_feat.shape[2], -1)  # [nf, nloc, nnei, dim]
        w = self.pair_weight(torch.cat([d.pair_feat, D_i], -1)).squeeze(-1) * d.pair_sw  # [nf, nloc, nnei]
        dx = (w.unsqueeze(-1) * d.pair_vec).sum(-2) / (d.pair_sw.sum(-1, keepdim=True) + eps)  # [nf, nloc, 3]
        return dx, self.type_logits(d.descriptor)


def denoise_dtype(cfg: DenoiseNetConfig, descriptor_dtype: torch.dtype) -> torch.dtype:
    """A head's precision: its own when given, else the descriptor's."""
    return descriptor_dtype if cfg.precision == "default" else DTYPES[cfg.precision]
