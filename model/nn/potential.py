"""The potential: descriptor -> fitting -> atomic energies; forces and virial by autograd.

    E      = sum_i (F_{t_i}(D_i) + out_bias[t_i])
    F_i    = -dE/dr_i                       (summed over the periodic images of atom i)
    W      = -sum_{j in ext} r_j (x) dE/dr_j  (deepmd-kit's virial, = -stress * volume)
The extended coordinates r_ext = r[mapping] + shift @ box are rebuilt from local ones on every
call; dE/dr_ext is one `autograd.grad` (create_graph only while training, for the force loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lamflow.model.data.batch import Batch
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor import build_descriptor
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.network import DTYPES


@runtime_checkable
class Potential(Protocol):
    """What lamflow asks of any model it loads, evaluates, tests or exports (EnergyModel,
    nn/multitask.py MultiTaskModel, nn/compressed.py CompressedModel): read these, never
    probe with getattr/hasattr.
        kind              checkpoint kind: "energy", "multitask" or "compressed" (io/checkpoint.py KINDS)
        type_map          element names; atom type t is type_map[t]
        cfg               its validated config (a pydantic model; `dtype_name` gives the precision)
        dtype             the float dtype of its weights
        nlist_requests()  the neighbour lists it needs, each with its rcut and sel (data/neighbor.py)"""

    kind: str
    type_map: list[str]
    cfg: Any

    @property
    def dtype(self) -> torch.dtype: ...

    def nlist_requests(self) -> list[NlistRequest]: ...


class EnergyModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.type_map = list(cfg.type_map)
        ntypes = len(self.type_map)
        self.descriptor = build_descriptor(cfg.descriptor, ntypes)
        self.fitting = EnergyFitting(cfg.fitting_net, self.descriptor.dim_out, ntypes, self.descriptor.mixed_types)
        self.register_buffer("out_bias", torch.zeros(ntypes, dtype=DTYPES[cfg.dtype_name]))

    kind = "energy"  # checkpoint kind (checkpoint.KINDS)

    @classmethod
    def from_config(cls, config: dict) -> "EnergyModel":
        return cls(ModelConfig.model_validate(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.out_bias.dtype

    def nlist_requests(self):
        return self.descriptor.nlist_requests()

    def atomic_energy(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                      mapping: Tensor | None = None) -> Tensor:
        """mapping [nf, nall]: extended -> local atom (message-passing descriptors such as dpa2 need it)."""
        nloc = nlists[0].shape[1]
        atype = atype_ext[:, :nloc]
        d = self.descriptor(coord_ext, atype_ext, nlists, mapping=mapping)
        return self.fitting(d.descriptor, atype) + self.out_bias[atype.clamp(min=0)] * (atype >= 0)

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> Tensor:
        return self.atomic_energy(coord_ext, atype_ext, nlists, mapping)


@dataclass
class Prediction:
    energy: Tensor  # [nf]
    atom_energy: Tensor  # [nf, nloc]
    force: Tensor | None = None  # [nf, nloc, 3]
    virial: Tensor | None = None  # [nf, 9]


def extended_inputs(batch: Batch, dtype: torch.dtype):
    """coord_ext [nf, nall, 3] and atype_ext [nf, nall] (padding stays -1)."""
    idx = batch.mapping.unsqueeze(-1).expand(-1, -1, 3)
    coord = batch.coord.to(dtype)
    coord_ext = torch.gather(coord, 1, idx)
    if batch.box is not None:
        coord_ext = coord_ext + batch.shift.to(dtype) @ batch.box.to(dtype)
    atype_ext = torch.gather(batch.atype, 1, batch.mapping)  # padded ghost slots are in no list
    return coord_ext, atype_ext


def energy_and_grad(atomic_energy_fn, batch: Batch, dtype: torch.dtype, *, forces: bool = True, virial: bool = False,
                    create_graph: bool = False) -> Prediction:
    """The one autograd helper: energies, and forces / virial from dE/dr_ext."""
    coord_ext, atype_ext = extended_inputs(batch, dtype)
    need_grad = forces or virial
    if need_grad:
        coord_ext = coord_ext.detach().requires_grad_(True)
    with torch.set_grad_enabled(need_grad or torch.is_grad_enabled()):
        ae = atomic_energy_fn(coord_ext, atype_ext, batch.nlists, mapping=batch.mapping)  # [nf, nloc]
        energy = ae.sum(-1)
        pred = Prediction(energy, ae)
        if need_grad:
            (g,) = torch.autograd.grad(energy.sum(), coord_ext, create_graph=create_graph)  # [nf, nall, 3]
            if forces:
                idx = batch.mapping.unsqueeze(-1).expand(-1, -1, 3)
                pred.force = -torch.zeros_like(batch.coord, dtype=g.dtype).scatter_add(1, idx, g)
            if virial:
                pred.virial = -(g.unsqueeze(-1) * coord_ext.unsqueeze(-2)).sum(1).reshape(-1, 9)  # [a, b] = -sum g_a r_b
    return pred


def predict(model: EnergyModel, batch: Batch, *, forces: bool = True, virial: bool = False,
            create_graph: bool = False) -> Prediction:
    return energy_and_grad(model.atomic_energy, batch, model.dtype, forces=forces, virial=virial, create_graph=create_graph)
