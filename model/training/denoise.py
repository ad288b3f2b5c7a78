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

import torch
import torch.nn.functional as F
from torch import Tensor

from lamflow.model.data.batch import Batch
from lamflow.model.nn.potential import extended_inputs
from lamflow.model.training.config import DenoiseLossConfig


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


