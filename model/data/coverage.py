"""Element coverage of a model: "in the type map" is not "trained on".

A type map may list elements the model never saw: a multi-task model's shared type map is the
union of its heads', and a pretrained model keeps every element of its type map whether or not
its data held one. Training therefore records the elements its data contained (at least one atom
in some training frame, any branch) in the checkpoint as `trained_elements`, and a multi-task
model those of each branch as `trained_elements_by_branch`; coverage reports both sets:
    uncovered  elements of the data that are not in the type map (the model cannot take them)
    untrained  elements in the type map that no training frame contained (it takes them, but
               their embedding or network is untrained: its predictions there mean nothing)
Checkpoints written before this record have no `trained_elements`; then only `uncovered` is known.
"""

from __future__ import annotations

from ase.data import atomic_numbers


def observed_elements(systems) -> list[str]:
    """Elements with at least one atom in `systems` (lamflow Systems), by atomic number."""
    import numpy as np

    seen = {s.elements[int(t)] for s in systems for t in np.unique(s.atype) if t >= 0}
    return sorted(seen, key=lambda e: (atomic_numbers.get(e, 999), e))


def trained_elements(payload: dict, branch: str | None = None) -> list[str] | None:
    """The elements a checkpoint's model (its branch `branch`, when recorded) was trained on; None
    when the checkpoint does not say."""
    by_branch = payload.get("trained_elements_by_branch") or {}
    got = by_branch.get(branch) if branch in by_branch else payload.get("trained_elements")
    return None if got is None else list(got)


def element_coverage(data_elements: list[str], type_map: list[str], trained: list[str] | None) -> dict:
    """{"uncovered": [...], "untrained": [...] or None when `trained` is unknown} for the data's elements."""
    uncovered = [e for e in data_elements if e not in type_map]
    untrained = None if trained is None else [e for e in data_elements if e in type_map and e not in trained]
    return {"uncovered": uncovered, "untrained": untrained}
