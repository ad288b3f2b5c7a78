"""The multi-task model: one shared descriptor, one head per branch (training/multitask.py trains it).

    D_i      = descriptor(structure)                      shared by every branch (type embedding included)
    E^b_i    = F^b_{t_i}(D_i) + out_bias^b[t_i]           energy branch b: its own fitting net and bias
    dx^b_i   = denoise head^b(descriptor output)          denoise branch (nn/denoise_head.py)
Branch names are also the names of checkpoint entries (`heads.<name>.*`); `branch_model(name)`
extracts one energy branch as a stand-alone EnergyModel."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from lamflow.model.errors import ConfigError
from lamflow.model.nn.config import MASK, DenoiseNetConfig, DescriptorConfig, FittingConfig, ModelConfig
from lamflow.model.nn.denoise_head import DenoiseHead, denoise_dtype
from lamflow.model.nn.descriptor import build_descriptor
from lamflow.model.nn.descriptor_config import dtype_name
from lamflow.model.nn.fitting import EnergyFitting
from lamflow.model.nn.network import DTYPES
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.schema import Strict


class EnergyHeadConfig(Strict):
    task: Literal["ener"] = "ener"
    type_map: list[str]  # the elements of this branch (a subset of the model's type map)
    fitting_net: FittingConfig


class DenoiseHeadConfig(Strict):
    task: Literal["denoise"] = "denoise"
    type_map: list[str]
    fitting_net: DenoiseNetConfig


HeadConfig = Annotated[Union[EnergyHeadConfig, DenoiseHeadConfig], Field(discriminator="task")]


class MultiTaskModelConfig(Strict):
    """What a multi-task checkpoint stores: the resolved model (sel counted, references replaced)."""

    type_map: list[str]  # shared elements, then MASK when a denoise branch masks types
    descriptor: DescriptorConfig
    branches: dict[str, HeadConfig]
    data_stat_nbatch: int = 10
    data_stat_protect: float = 1e-2

    @property
    def elements(self) -> list[str]:
        return [e for e in self.type_map if e != MASK]

    @property
    def mask_type(self) -> int | None:
        return self.type_map.index(MASK) if MASK in self.type_map else None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.descriptor.precision)


class EnergyHead(nn.Module):
    def __init__(self, cfg: FittingConfig, dim_in: int, ntypes: int, mixed_types: bool, dtype: torch.dtype):
        super().__init__()
        self.fitting = EnergyFitting(cfg, dim_in, ntypes, mixed_types)
        self.register_buffer("out_bias", torch.zeros(ntypes, dtype=dtype))


def pair_feature_dim(descriptor) -> int:
    """Width M of DescriptorOutput.pair_feat, from one forward on a two-atom structure (any descriptor)."""
    coord = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=next(descriptor.buffers()).dtype)
    atype = torch.zeros(1, 2, dtype=torch.long)
    nlists = []
    for req in descriptor.nlist_requests():
        nl = torch.full((1, 2, req.nnei), -1, dtype=torch.long)
        nl[0, 0, 0], nl[0, 1, 0] = 1, 0
        nlists.append(nl)
    with torch.no_grad():
        return int(descriptor(coord, atype, nlists).pair_feat.shape[-1])


class MultiTaskModel(nn.Module):
    """Shared descriptor + one head per branch (`heads.<name>`). `branch(name)` is the view the
    losses and the trainer use; `branch_model(name)` extracts a stand-alone EnergyModel."""

    kind = "multitask"  # checkpoint kind (checkpoint.KINDS)

    def __init__(self, cfg: MultiTaskModelConfig):
        super().__init__()
        self.cfg = cfg
        self.type_map = list(cfg.type_map)
        ntypes = len(self.type_map)
        self.descriptor = build_descriptor(cfg.descriptor, ntypes)
        dtype = DTYPES[cfg.dtype_name]
        self.heads = nn.ModuleDict()
        for name, h in cfg.branches.items():
            if h.task == "ener":
                self.heads[name] = EnergyHead(h.fitting_net, self.descriptor.dim_out, ntypes, self.descriptor.mixed_types, dtype)
            else:
                self.heads[name] = DenoiseHead(h.fitting_net, self.descriptor.dim_out, pair_feature_dim(self.descriptor),
                                               len(cfg.elements), denoise_dtype(h.fitting_net, dtype))

    @classmethod
    def from_config(cls, config: dict) -> "MultiTaskModel":
        return cls(MultiTaskModelConfig.model_validate(config))

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype_name]

    @property
    def energy_branches(self) -> list[str]:
        return [n for n, h in self.cfg.branches.items() if h.task == "ener"]

    def nlist_requests(self):
        return self.descriptor.nlist_requests()

    def atomic_energy(self, name: str, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                      mapping: Tensor | None = None) -> Tensor:
        """Branch `name`'s atomic energies [nf, nloc] (0 on padding); mapping [nf, nall] as EnergyModel's."""
        nloc = nlists[0].shape[1]
        atype = atype_ext[:, :nloc]
        head = self.heads[name]
        d = self.descriptor(coord_ext, atype_ext, nlists, mapping=mapping)
        return head.fitting(d.descriptor, atype) + head.out_bias[atype.clamp(min=0)] * (atype >= 0)

    def denoise(self, name: str, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor],
                mapping: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Branch `name`'s displacement [nf, nloc, 3] and type logits [nf, nloc, n_elements]."""
        d = self.descriptor(coord_ext, atype_ext, nlists, mapping=mapping)
        return self.heads[name](d)

    def branch(self, name: str) -> "Branch":
        self._check_branch(name)
        return Branch(self, name)

    def branch_model(self, name: str | None = None) -> EnergyModel:
        """Energy branch `name` as a stand-alone EnergyModel (a copy of the shared descriptor and
        of the head, on the same device); None picks the only energy branch."""
        name = self.resolve_branch(name)
        h = self.cfg.branches[name]
        mcfg = ModelConfig(type_map=self.type_map, descriptor=self.cfg.descriptor, fitting_net=h.fitting_net,
                           data_stat_nbatch=self.cfg.data_stat_nbatch, data_stat_protect=self.cfg.data_stat_protect)
        model = EnergyModel(mcfg)
        head = self.heads[name]
        state = {f"descriptor.{k}": v for k, v in self.descriptor.state_dict().items()}
        state.update({f"fitting.{k}": v for k, v in head.fitting.state_dict().items()})
        state["out_bias"] = head.out_bias
        model.load_state_dict(state)
        return model.to(head.out_bias.device)

    def resolve_branch(self, name: str | None) -> str:
        if name is None:
            if len(self.energy_branches) != 1:
                raise ConfigError(f"a multi-task model: choose a branch ({', '.join(self.energy_branches)})")
            return self.energy_branches[0]
        self._check_branch(name)
        if self.cfg.branches[name].task != "ener":
            raise ConfigError(f"branch {name!r} is a {self.cfg.branches[name].task} head, not an energy model "
                              f"(energy branches: {', '.join(self.energy_branches)})")
        return name

    def _check_branch(self, name: str) -> None:
        if name not in self.cfg.branches:
            raise ConfigError(f"no branch {name!r} in this model (branches: {', '.join(self.cfg.branches)})")


class Branch:
    """One head of a MultiTaskModel seen as a model: what the losses, the trainer and evaluation
    call (`atomic_energy`, `denoise`, `dtype`, `type_map`, `out_bias`). It holds no weights of its
    own, so it never goes stale when the root moves to another device."""

    def __init__(self, root: MultiTaskModel, name: str):
        self.root, self.name = root, name
        self.task = root.cfg.branches[name].task

    @property
    def dtype(self) -> torch.dtype:
        return self.root.dtype

    @property
    def type_map(self) -> list[str]:
        return self.root.type_map

    @property
    def out_bias(self) -> Tensor:
        """An energy branch's bias (evaluation also reads the device from it)."""
        return self.root.heads[self.name].out_bias

    def nlist_requests(self):
        return self.root.nlist_requests()

    def atomic_energy(self, coord_ext, atype_ext, nlists, mapping=None):
        return self.root.atomic_energy(self.name, coord_ext, atype_ext, nlists, mapping)

    def denoise(self, coord_ext, atype_ext, nlists, mapping=None):
        return self.root.denoise(self.name, coord_ext, atype_ext, nlists, mapping)
