"""The Descriptor base class and its registry, what every descriptor returns, and the small
pieces they share.

A descriptor class names its config class, `class SeE2A(Descriptor, config=SeE2AConfig)`, and
is registered under that config's `type` tags (nn/config.py: DESCRIPTOR_TAGS, the one list)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.config import descriptor_tags
from lamflow.model.nn.env_mat import EnvStat, env_mat
from lamflow.model.nn.network import EmbeddingNet


@dataclass
class DescriptorOutput:
    descriptor: Tensor  # [nf, nloc, dim_out]           rotation-invariant per-atom features
    pair_feat: Tensor  # [nf, nloc, nnei, M]            per-neighbour features (for vector heads)
    pair_vec: Tensor  # [nf, nloc, nnei, 3]             r_ij = r_j - r_i, 0 in empty slots
    pair_sw: Tensor  # [nf, nloc, nnei]                 switch sw(r_ij), 0 in empty slots
    nlist: Tensor  # [nf, nloc, nnei]                   the list pair_* refer to


REGISTRY: dict[str, type["Descriptor"]] = {}  # config `type` tag -> descriptor class


class Descriptor(nn.Module):
    """Coordinates and neighbour lists -> per-atom rotation-invariant features (DescriptorOutput).

    Every descriptor has: its config (`self.cfg`), `dim_out` (features per atom), `mixed_types`
    (True: one neighbour list over all types and one shared fitting net; False: per-type blocks
    and nets), the neighbour lists it needs (`nlist_requests`: rcut and sel of each), and
    `resolve_sel` (sel "auto" -> counts from the data)."""

    config: ClassVar[type]  # its config class (nn/config.py)
    mixed_types: ClassVar[bool]
    dim_out: int

    def __init_subclass__(cls, config: type | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if config is None:
            return
        cls.config = config
        cls.mixed_types = config.mixed_types
        for tag in descriptor_tags(config):
            if tag in REGISTRY:
                raise TypeError(f"descriptor tag {tag!r} registered twice ({REGISTRY[tag].__name__}, {cls.__name__})")
            REGISTRY[tag] = cls

    @abstractmethod
    def nlist_requests(self) -> list[NlistRequest]:
        """The neighbour lists forward() takes, in order (rcut, sel, typed or mixed)."""

    @staticmethod
    @abstractmethod
    def resolve_sel(cfg, counter: Callable):
        """`cfg` with sel "auto"/"auto:r" replaced by counts; counter(rcut) -> max neighbour counts per type."""


class TypeEmbedding(nn.Module):
    """deepmd-kit's TypeEmbedNet: A_t = EmbeddingNet(one_hot(t) -> [tebd_dim]) with a linear
    activation (and the residual rule), no bias unless use_tebd_bias; a zero row is appended
    for the padding type (index ntypes), used by empty atoms."""

    def __init__(self, ntypes: int, tebd_dim: int, resnet_dt: bool = False, use_bias: bool = False,
                 dtype=torch.float64, generator=None):
        super().__init__()
        self.ntypes = ntypes
        self.net = EmbeddingNet(ntypes, [tebd_dim], "linear", resnet_dt, dtype, generator, bias=use_bias)

    def table(self) -> Tensor:
        """[ntypes + 1, tebd_dim], last row zero."""
        eye = torch.eye(self.ntypes, dtype=self.net.layers[0].matrix.dtype, device=self.net.layers[0].matrix.device)
        emb = self.net(eye)
        return torch.cat([emb, torch.zeros_like(emb[:1])], dim=0)

    def forward(self, atype: Tensor) -> Tensor:
        """atype [...] with -1 for padding -> [..., tebd_dim]."""
        idx = torch.where(atype < 0, torch.full_like(atype, self.ntypes), atype)
        return self.table()[idx]


class EnvMatBlock(nn.Module):
    """Normalised env matrix of one neighbour list, with per-centre-type mean/std buffers."""

    def __init__(self, rcut: float, rcut_smth: float, nnei: int, ntypes: int, dtype, protection: float = 0.0,
                 set_davg_zero: bool = False):
        super().__init__()
        self.rcut, self.rcut_smth, self.nnei, self.protection = rcut, rcut_smth, nnei, protection
        self.set_davg_zero = set_davg_zero
        self.register_buffer("mean", torch.zeros(ntypes, nnei, 4, dtype=dtype))
        self.register_buffer("stddev", torch.ones(ntypes, nnei, 4, dtype=dtype))

    def raw(self, coord_ext: Tensor, nlist: Tensor):
        return env_mat(coord_ext, nlist, self.rcut_smth, self.rcut, self.protection)

    def forward(self, coord_ext: Tensor, atype: Tensor, nlist: Tensor):
        """atype [nf, nloc] (centres). Returns R^ [nf, nloc, nnei, 4], r_ij, sw."""
        R, diff, sw = self.raw(coord_ext, nlist)
        t = atype.clamp(min=0)
        return (R - self.mean[t]) / self.stddev[t], diff, sw

    @torch.no_grad()
    def set_stats(self, samples, protect: float = 1e-2, which: int = 0) -> None:
        """samples: iterable of (coord_ext, atype_ext, nlists); `which` picks this block's list."""
        acc = EnvStat(self.mean.shape[0])
        for coord_ext, atype_ext, nlists in samples:
            nlist = nlists[which]
            R, _, _ = self.raw(coord_ext.to(self.mean.dtype), nlist)
            acc.add(R, atype_ext[:, : nlist.shape[1]])
        mean, std = acc.mean_std(self.nnei, protect, self.set_davg_zero)
        self.mean.copy_(mean.to(self.mean))
        self.stddev.copy_(std.to(self.stddev))


# deepmd-kit state-dict entries that hold no weight in lamflow's modules: the second registration of
# each network list, and the (empty) compression tables
DEEPMD_BOOKKEEPING = ("_networks", "compress_info", "compress_data", "type_embd_data")


def rename_deepmd_key(key: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    """A deepmd-kit descriptor state-dict key (without the model's `descriptor.` prefix) -> the
    lamflow name: the first (theirs, ours) prefix that matches is replaced, other keys keep their
    name; None for bookkeeping entries (DEEPMD_BOOKKEEPING)."""
    if any(part in DEEPMD_BOOKKEEPING for part in key.split(".")):
        return None
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key
