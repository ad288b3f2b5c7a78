"""Denoise pre-training on structures without labels (OpenLAM 2024 Q0; deepmd-kit's 2024 DenoiseNet).

A denoise branch corrupts a clean structure and asks the shared descriptor to undo it:
    x~_i  = x_i + sigma eps_i,  eps_i ~ N(0, 1)        on a fraction `noise_ratio` of the atoms
    t~_i  = MASK                                         on a fraction `mask_ratio` of the atoms
The head reads the descriptor of the corrupted structure:
    w_ij  = sw(r_ij) MLP_w(G_ij, D_i)                    G_ij = DescriptorOutput.pair_feat    [nnei]
    dx_i  = sum_j w_ij r_ij / (sum_j sw(r_ij) + eps)     r_ij = x~_j - x~_i               [3]
    p_i   = softmax(MLP_t(D_i))                          over the ntypes real elements     [ntypes]
    L     = pref_coord mean_{noised i, a} (dx_ia - (x_i - x~_i)_a)^2 + pref_type CE(p_i, t_i | masked i)
G_ij and D_i are rotation invariant and r_ij rotates with the structure, so dx is equivariant
(rotate the input, the predicted displacement rotates); sw makes it continuous at rcut. D_i in
MLP_w lets the weights depend on the whole environment of i, not only on the pair (with pair
features alone, as in deepmd-kit's 2024 head, dx is a sum of central pair "springs", which cannot
undo a displacement across the bonds).

The MASK token (design): a model with a type-masking denoise branch gets one extra pseudo-type
"MASK" appended to its type map (index ntypes). It is used only as input: no data atom has it,
energy heads give it bias 0 and never see it, the type head predicts only the real elements.
Masked atoms carry it in the batch (and so do their periodic images), so a mixed-type descriptor
sees "an atom of unknown element" through its type embedding. A typed descriptor (se_e2_a)
sorts neighbours into blocks by element, so it cannot hide a type: such a model may denoise
coordinates only (mask_ratio 0).

Noise is drawn on the CPU from torch's global generator while training (its state is in every
checkpoint, so a restart continues exactly) and from a fixed-seed generator for validation (the
same corrupted frames at every display step, so the validation curve is comparable). Neighbour
lists are those of the clean structure: with sigma well below rcut - rcut_smth an atom entering
the sphere from beyond rcut is rare, and one leaving it fades out through sw.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lamflow.model.data.batch import Batch
from lamflow.model.nn.descriptor_config import Activation
from lamflow.model.nn.network import DTYPES, FittingNet, make_generator
from lamflow.model.schema import Strict

MASK = "MASK"  # the input-only pseudo-type appended to the type map when types are masked


class DenoiseNetConfig(Strict):
    """The denoise head of a `task: denoise` branch (its `fitting_net` section)."""

    neuron: list[int] = [32, 32]  # hidden widths of MLP_w (pair weights) and MLP_t (type logits)
    activation_function: Activation = "tanh"
    precision: Literal["default", "float64", "float32"] = "default"
    seed: int | None = None


class DenoiseLossConfig(Strict):
    """`loss_dict.<branch>` of a denoise branch: how to corrupt and how to weigh the two terms."""

    type: Literal["denoise"] = "denoise"
    noise: float = Field(0.2, gt=0)  # Angstrom, std of the Gaussian coordinate noise
    noise_ratio: float = Field(0.2, gt=0, le=1)  # fraction of atoms displaced (their neighbours stay clean)
    mask_ratio: float = Field(0.15, ge=0, lt=1)  # fraction of atoms whose type is masked (at least one when > 0)
    pref_coord: float = Field(1.0, ge=0)
    pref_type: float = Field(1.0, ge=0)
    valid_seed: int = 0  # generator seed for the corruption of validation batches


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


def pick_atoms(real: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """[nf, nloc] bool: round(ratio * natoms) random real atoms of each frame (at least one)."""
    n = real.sum(-1)  # [nf]
    k = torch.clamp((ratio * n).round().long(), min=1)
    scores = torch.rand(real.shape, generator=generator, dtype=torch.float64)
    scores = scores.masked_fill(~real, 2.0)  # padding never chosen
    rank = scores.argsort(-1).argsort(-1)  # [nf, nloc] rank of each atom in its frame
    return (rank < k[:, None]) & real


def corrupt(batch: Batch, cfg: DenoiseLossConfig, mask_type: int | None, generator: torch.Generator | None = None):
    """Noisy, masked copy of a (CPU or device) batch. Returns (batch~, target dx [nf, nloc, 3],
    noised [nf, nloc] bool, masked [nf, nloc] bool, clean atype [nf, nloc])."""
    dev = batch.coord.device
    real = (batch.atype >= 0).cpu()
    noised = pick_atoms(real, cfg.noise_ratio, generator)
    eps = torch.randn(batch.coord.shape, generator=generator, dtype=torch.float64) * cfg.noise
    eps = (eps * noised[..., None]).to(dev, batch.coord.dtype)  # [nf, nloc, 3]
    atype = batch.atype
    if cfg.mask_ratio > 0:
        masked = pick_atoms(real, cfg.mask_ratio, generator)
        atype = torch.where(masked.to(dev), torch.full_like(atype, mask_type), atype)
    else:
        masked = torch.zeros_like(real)
    noisy = replace(batch, coord=batch.coord + eps, atype=atype)
    return noisy, -eps, noised.to(dev), masked.to(dev), batch.atype


class DenoiseLoss:
    """(model, batch, coef, training) -> (loss, metrics) for a denoise branch. `model` has
    `denoise(coord_ext, atype_ext, nlists, mapping) -> (dx, logits)` and `dtype`; `mask_type` is the index
    of the MASK pseudo-type (None when the model has none)."""

    def __init__(self, cfg: DenoiseLossConfig, mask_type: int | None):
        self.cfg, self.mask_type = cfg, mask_type

    def __call__(self, model, batch: Batch, coef: float = 1.0, training: bool = True):
        from lamflow.model.nn.potential import extended_inputs

        gen = None
        if not training:  # the same corruption of a validation batch at every display step
            gen = torch.Generator().manual_seed(self.cfg.valid_seed + int(abs(batch.coord.sum().item()) * 1e3) % 1000003)
        noisy, target, noised, masked, clean = corrupt(batch, self.cfg, self.mask_type, gen)
        with torch.set_grad_enabled(training):
            coord_ext, atype_ext = extended_inputs(noisy, model.dtype)
            dx, logits = model.denoise(coord_ext, atype_ext, noisy.nlists, noisy.mapping)
            err2 = ((dx - target.to(dx.dtype)) ** 2).sum(-1)  # [nf, nloc]
            mse = (err2 * noised).sum() / (3 * noised.sum())
            loss = self.cfg.pref_coord * mse
            metrics = {"rmse_coord": float(mse.detach().sqrt())}
            if masked.any():
                ce = F.cross_entropy(logits[masked], clean[masked])
                loss = loss + self.cfg.pref_type * ce
                acc = (logits[masked].argmax(-1) == clean[masked]).double().mean()
                metrics.update({"ce_type": float(ce.detach()), "acc_type": float(acc)})
        return loss, metrics


def denoise_dtype(cfg: DenoiseNetConfig, descriptor_dtype: torch.dtype) -> torch.dtype:
    """A head's precision: its own when given, else the descriptor's."""
    return descriptor_dtype if cfg.precision == "default" else DTYPES[cfg.precision]
