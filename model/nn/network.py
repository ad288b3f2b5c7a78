"""Layers with deepmd-kit's conventions (dpmodel NativeLayer / EmbeddingNet / FittingNet).

    y = act(x W + b) [* idt]           idt: trainable per-channel "timestep" when resnet_dt and
                                       width(out) is width(in) or 2 width(in)
    y = y + x          if resnet and width(out) == width(in)
    y = y + [x, x]     if resnet and width(out) == 2 width(in)
Init: W ~ N(0, 1/sqrt(n_in + n_out)), b ~ N(0, 1), idt ~ N(0.1, 0.001).
Parameter names (`matrix`, `bias`, `idt`) are deepmd-kit's, which keeps weight import simple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "tanh": torch.tanh,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tf": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
    "none": lambda x: x,
}

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Layer(nn.Module):
    def __init__(self, n_in: int, n_out: int, activation: str | None = "tanh", resnet: bool = False,
                 use_timestep: bool = False, bias: bool = True, dtype=torch.float64, generator=None,
                 std: float = 1.0, bavg: float = 0.0):
        super().__init__()
        self.n_in, self.n_out, self.resnet = n_in, n_out, resnet
        self.act_name = activation or "linear"
        self.act = ACTIVATIONS[self.act_name]
        g = generator
        self.matrix = nn.Parameter(torch.randn(n_in, n_out, dtype=dtype, generator=g) * (std / math.sqrt(n_in + n_out)))
        self.bias = nn.Parameter(bavg + torch.randn(n_out, dtype=dtype, generator=g) * std) if bias else None
        # deepmd-kit keeps a timestep only where a residual can follow (n_out = n_in or 2 n_in)
        use_timestep = use_timestep and n_out in (n_in, 2 * n_in)
        self.idt = nn.Parameter(0.1 + 0.001 * torch.randn(n_out, dtype=dtype, generator=g)) if use_timestep else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.matrix
        if self.bias is not None:
            y = y + self.bias
        y = self.act(y)
        if self.idt is not None:
            y = y * self.idt
        if self.resnet and self.n_out == self.n_in:
            y = y + x
        elif self.resnet and self.n_out == 2 * self.n_in:
            y = y + torch.cat([x, x], dim=-1)
        return y


class EmbeddingNet(nn.Module):
    """in_dim -> neuron[0] -> ... -> neuron[-1], every layer with the residual rule."""

    def __init__(self, in_dim: int, neuron: list[int], activation: str = "tanh", resnet_dt: bool = False,
                 dtype=torch.float64, generator=None, bias: bool = True):
        super().__init__()
        dims = [in_dim, *neuron]
        self.layers = nn.ModuleList(
            Layer(a, b, activation, resnet=True, use_timestep=resnet_dt, bias=bias, dtype=dtype, generator=generator)
            for a, b in zip(dims[:-1], dims[1:])
        )
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FittingNet(nn.Module):
    """Hidden EmbeddingNet, then a linear output layer (no residual, no timestep)."""

    def __init__(self, in_dim: int, neuron: list[int], out_dim: int = 1, activation: str = "tanh",
                 resnet_dt: bool = True, dtype=torch.float64, generator=None):
        super().__init__()
        self.hidden = EmbeddingNet(in_dim, neuron, activation, resnet_dt, dtype, generator)
        self.out = Layer(neuron[-1] if neuron else in_dim, out_dim, None, dtype=dtype, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
