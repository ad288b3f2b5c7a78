"""Descriptor registry: the `type` key of a descriptor config -> its class."""

from __future__ import annotations

from lamflow.model.nn.descriptor.base import DescriptorOutput, TypeEmbedding
from lamflow.model.nn.descriptor.dpa2 import DPA2
from lamflow.model.nn.descriptor.dpa3 import DPA3
from lamflow.model.nn.descriptor.se_atten import SeAtten
from lamflow.model.nn.descriptor.se_e2_a import SeE2A

REGISTRY = {
    "se_e2_a": SeE2A,
    "se_a": SeE2A,
    "se_atten": SeAtten,
    "dpa1": SeAtten,
    "se_atten_v2": SeAtten,
    "dpa2": DPA2,
    "dpa3": DPA3,
}


def build_descriptor(cfg, ntypes: int):
    try:
        cls = REGISTRY[cfg.type]
    except KeyError:
        raise ValueError(f"unknown descriptor type {cfg.type!r}; known: {sorted(REGISTRY)}") from None
    return cls(cfg, ntypes)


__all__ = ["REGISTRY", "build_descriptor", "DescriptorOutput", "TypeEmbedding", "SeAtten", "SeE2A", "DPA2", "DPA3"]
