"""Evaluate a model on raw frames (numpy in, numpy out): what `test`, the ASE calculator and
distillation call. Neighbour lists are built per frame; more neighbours than `sel` keeps the
nearest (deepmd-kit's inference behaviour) and warns once."""

from __future__ import annotations

import warnings

import numpy as np

from lamflow.model.data.batch import collate
from lamflow.model.data.neighbor import NeighborOverflow, build_graph
from lamflow.model.data.systems import System
from lamflow.model.nn.potential import predict


def _graph(model, coord, box, atype):
    try:
        return build_graph(coord, box, atype, model.nlist_requests())
    except NeighborOverflow as e:
        warnings.warn(f"{e}: keeping the nearest neighbours (the model never saw such a dense environment)", stacklevel=3)
        return build_graph(coord, box, atype, model.nlist_requests(), truncate=True)


def evaluate(model, coord, box, atype, *, forces: bool = True, virial: bool = True, batch_size: int = 8,
             device=None) -> dict[str, np.ndarray]:
    """coord [nf, natoms, 3], box [nf, 3, 3] or None, atype [natoms] (indices into model.type_map).
    Returns energy [nf], force [nf, natoms, 3], virial [nf, 9] as float64 numpy arrays."""
    coord = np.asarray(coord, dtype=np.float64)
    if coord.ndim == 2:
        coord = coord[None]
    atype = np.asarray(atype, dtype=np.int64)
    if box is not None:
        box = np.asarray(box, dtype=np.float64).reshape(-1, 3, 3)
        if len(box) == 1 and len(coord) > 1:
            box = np.repeat(box, len(coord), axis=0)
    sys_ = System("frames", list(model.type_map), atype, coord, box)
    device = device or model.out_bias.device
    out = {"energy": [], "force": [], "virial": []}
    for start in range(0, len(coord), batch_size):
        ks = range(start, min(start + batch_size, len(coord)))
        items = [(sys_, k, _graph(model, coord[k], None if box is None else box[k], atype)) for k in ks]
        batch = collate(items, model.dtype).to(device)
        p = predict(model, batch, forces=forces, virial=virial and box is not None)
        out["energy"].append(p.energy.detach().double().cpu().numpy())
        if forces:
            out["force"].append(p.force.detach().double().cpu().numpy())
        if p.virial is not None:
            out["virial"].append(p.virial.detach().double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def evaluate_system(model, s: System, **kw) -> dict[str, np.ndarray]:
    return evaluate(model, s.coord, s.box, s.atype, **kw)
