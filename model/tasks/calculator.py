"""ASE calculator for any lamflow model (energy, EnergyModel, CompressedModel, ...).

    energy  E                      eV
    forces  F_i = -dE/dr_i          eV/A
    stress  sigma = -W / V          eV/A^3, ASE's Voigt order (xx, yy, zz, yz, xz, xy)
W is deepmd-kit's virial, -dE/d(eps) under the strain r -> (1 + eps) r of atoms and cell, so
sigma = (1/V) dE/d(eps): ASE's convention (pressure = -trace(sigma) / 3).
Atoms are mapped onto the model's type map by element name. A fully periodic cell or no
periodicity at all are supported; mixed periodicity (slabs, wires) is refused, since the
neighbour lists know no partly periodic cell.

For the MD guards (md.py) the calculator also knows `min_nbor_dist`, the closest pair of the
model's training data (stored in distilled and compressed checkpoints; None when unknown), and,
for a compressed model, counts the neighbour inputs that fall outside its tables
(`out_of_table_inputs()`; None for other models).
"""

from __future__ import annotations

import os

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from lamflow.model.errors import DataError
from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint, resolve_device
from lamflow.model.nn.infer import evaluate


class LamflowCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model_or_path, device: str = "auto", branch: str | None = None, **kwargs):
        """model_or_path: a model object or a checkpoint; `branch` picks the head of a multi-task model."""
        super().__init__(**kwargs)

        self.min_nbor_dist: float | None = None  # Angstrom, closest pair in the training data, when known
        if isinstance(model_or_path, (str, os.PathLike)):
            payload = read_checkpoint(model_or_path)
            model = build_from_payload(payload, str(model_or_path))
            self.min_nbor_dist = payload.get("min_nbor_dist")
        else:
            model = model_or_path
        model = model.to(resolve_device(device))
        self.min_nbor_dist = self.min_nbor_dist or getattr(model.cfg, "min_nbor_dist", None)  # compressed models keep it
        if model.kind == "multitask":
            model = model.branch_model(branch)
        self.model = model.eval()
        self.type_map = list(self.model.type_map)
        self._types_cache: tuple[tuple[str, ...], np.ndarray] | None = None
        self._tables = self.model.descriptor if self.model.kind == "compressed" else None
        if self._tables is not None:
            self._tables.count_range = True

    def out_of_table_inputs(self) -> int | None:
        """Neighbour inputs outside a compressed model's tables, over every call so far (None: not compressed)."""
        return None if self._tables is None else int(self._tables.out_of_range)

    def atom_types(self, symbols: list[str]) -> np.ndarray:
        """Element names -> indices into the model's type map (a DataError names the unknown ones)."""
        key = tuple(symbols)
        if self._types_cache is not None and self._types_cache[0] == key:
            return self._types_cache[1]
        unknown = sorted(set(symbols) - set(self.type_map))
        if unknown:
            raise DataError(f"element(s) {', '.join(unknown)} not in the model type map {self.type_map}")
        index = {e: k for k, e in enumerate(self.type_map)}
        types = np.array([index[e] for e in symbols], dtype=np.int64)
        self._types_cache = (key, types)
        return types

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise DataError(f"periodic in {pbc.tolist()} only: lamflow supports fully periodic or non-periodic systems")
        periodic = bool(pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a periodic cell")
        atype = self.atom_types(atoms.get_chemical_symbols())
        box = np.asarray(atoms.cell.array, dtype=np.float64)[None] if periodic else None
        out = evaluate(self.model, atoms.positions[None], box, atype, virial=periodic)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["force"][0]}
        if periodic:
            W = out["virial"][0].reshape(3, 3)
            self.results["stress"] = full_3x3_to_voigt_6_stress(-0.5 * (W + W.T) / atoms.get_volume())
