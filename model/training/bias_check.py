"""Is a per-element energy bias determined by the data it is fitted on?

The bias solves N b = E (least squares, stats.energy_bias), N [frames, types] the atom counts.
When every frame has the same composition, or the compositions are multiples or mixtures of
fewer than `ntypes` independent ones, N has rank r below the number of elements present: only
r combinations of the biases are fixed (water: 2 b_H + b_O), and lstsq returns the minimum-norm
split. The printed "H = ..., O = ..." then are no per-element reference energies, and a system of
another composition (fine-tuning on methane after pretraining on water) starts off by an
arbitrary energy. `underdetermined_bias` returns a one-line warning for that case.
"""

from __future__ import annotations

import numpy as np


def underdetermined_bias(systems, type_map: list[str]) -> str | None:
    """A warning when the compositions of the labelled `systems` do not determine the bias of each
    element present; None when they do (or nothing is labelled)."""
    rows = [np.bincount(np.asarray(s.atype), minlength=len(type_map)) for s in systems if getattr(s, "energy", None) is not None]
    if not rows:
        return None
    N = np.unique(np.stack(rows), axis=0)  # [compositions, ntypes]
    present = np.nonzero(N.sum(0))[0]
    rank = int(np.linalg.matrix_rank(N[:, present].astype(float)))
    if rank >= len(present):
        return None
    names = [type_map[i] for i in present]
    if len(N) == 1:
        counts = N[0, present]
        g = max(1, int(np.gcd.reduce(counts)))  # H128 O64 -> H2O
        hill = sorted(zip(names, counts.tolist()), key=lambda ec: ({"C": 0, "H": 1}.get(ec[0], 2), ec[0]))  # Hill order
        formula = "".join(f"{e}{c // g if c // g > 1 else ''}" for e, c in hill)
        how = f"every labelled frame has the composition {formula}"
    else:
        how = f"the {len(N)} compositions span {rank} of {len(present)} dimensions"
    return (f"energy bias of {', '.join(names)} is not determined by the data: {how}, which fixes {rank} combination"
            f"{'s' if rank != 1 else ''} of the {len(present)} per-element biases; the values printed are the minimum-norm "
            f"split, not per-element reference energies (systems of other compositions start from an arbitrary offset)")


def warn_underdetermined_bias(systems, type_map: list[str], log=print, prefix: str = "") -> str | None:
    """Log (and return) the warning of `underdetermined_bias`, if any; called where a bias is fitted."""
    note = underdetermined_bias(systems, list(type_map))
    if note:
        log(f"{prefix}warning: {note}")
    return note
