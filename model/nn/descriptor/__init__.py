"""Descriptors: se_e2_a, se_atten (DPA-1, se_atten_v2), dpa2, dpa3. Each class registers itself
under its config's `type` tags (base.py: Descriptor); importing this package fills REGISTRY."""

from __future__ import annotations

from lamflow.model.nn.descriptor.base import REGISTRY, Descriptor, DescriptorOutput, TypeEmbedding
from lamflow.model.nn.descriptor.dpa2 import DPA2
from lamflow.model.nn.descriptor.dpa3 import DPA3
from lamflow.model.nn.descriptor.se_atten import SeAtten
from lamflow.model.nn.descriptor.se_e2_a import SeE2A


def build_descriptor(cfg, ntypes: int) -> Descriptor:
    try:
        cls = REGISTRY[cfg.type]
    except KeyError:
        raise ValueError(f"unknown descriptor type {cfg.type!r}; known: {sorted(REGISTRY)}") from None
    return cls(cfg, ntypes)


__all__ = ["REGISTRY", "Descriptor", "build_descriptor", "DescriptorOutput", "TypeEmbedding", "SeAtten", "SeE2A", "DPA2",
           "DPA3"]
