"""Neighbour lists for periodic (any triclinic cell, also cells smaller than 2*rcut) and
non-periodic frames.

Per frame in numpy/cKDTree (build_graph, the reference), or per padded batch (batch_graph, in
data/batch_neighbors.py: in torch on the batch's device, or the reference frame by frame). Indices carry no gradient; the model
rebuilds the extended coordinates from the local ones so that forces and virials flow through autograd:

    coord_ext = coord[mapping] + shift @ box        # [nall, 3]; rows of box are cell vectors

The first nloc extended atoms are the local atoms themselves (mapping[:nloc] = arange(nloc); their
shift wraps them into the cell). Ghost atoms are periodic images within rcut of some local atom
that some list uses, nothing more.

Two kinds of lists (deepmd-kit's conventions):
- mixed (se_atten, DPA-2): one block of `sel` slots sorted by distance;
- typed (se_e2_a): one block per neighbour type, block t holds `sel[t]` slots, sorted by distance.
Empty slots are -1. More neighbours than slots is an error (`NeighborOverflow`) unless
`truncate=True`, which keeps the nearest (deepmd-kit's behaviour at inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class NlistRequest:
    rcut: float
    sel: tuple[int, ...]  # one entry: mixed list of sel[0] slots; ntypes entries: typed blocks
    mixed: bool

    @property
    def nnei(self) -> int:
        return int(sum(self.sel))


class NeighborOverflow(Exception):
    """More neighbours within rcut than `sel` slots; carries the counts found (and the frame of a
    batch, None for a single frame)."""

    def __init__(self, atom: int, counts: np.ndarray, sel: tuple[int, ...], frame: int | None = None):
        self.atom, self.counts, self.sel, self.frame = atom, np.asarray(counts), sel, frame
        where = "" if frame is None else f"frame {frame}: "
        super().__init__(f"{where}atom {atom} has {self.counts.tolist()} neighbours, sel is {list(sel)}")


@dataclass
class FrameGraph:
    mapping: np.ndarray  # [nall]            int64, extended atom -> local atom
    shift: np.ndarray  # [nall, 3]           float64 integer image vectors
    nlists: list[np.ndarray]  # each [nloc, nnei] int64 indices into the extended atoms, -1 empty

    @property
    def nall(self) -> int:
        return len(self.mapping)


@dataclass
class Pairs:
    """All (i, j) with |r_j - r_i| < rcut; i local, j extended."""

    i: np.ndarray
    j: np.ndarray
    d: np.ndarray
    mapping: np.ndarray
    shift: np.ndarray


def plane_spacings(box: np.ndarray) -> np.ndarray:
    """Distance between opposite faces of the cell, per cell vector: V / |b x c| etc."""
    vol = abs(np.linalg.det(box))
    crosses = np.stack([np.cross(box[1], box[2]), np.cross(box[2], box[0]), np.cross(box[0], box[1])])
    return vol / np.linalg.norm(crosses, axis=1)


def find_pairs(coord: np.ndarray, box: np.ndarray | None, rcut: float) -> Pairs:
    nloc = len(coord)
    if box is None:
        ext, mapping, shift = coord, np.arange(nloc), np.zeros((nloc, 3))
    else:
        inv = np.linalg.inv(box)
        frac = coord @ inv
        wrap = np.floor(frac)
        frac = frac - wrap  # in [0, 1)
        margin = rcut / plane_spacings(box)  # in fractional units
        nimg = np.ceil(margin).astype(int)
        images = sorted(product(*(range(-n, n + 1) for n in nimg)), key=lambda v: (v != (0, 0, 0), v))
        images = np.asarray(images, dtype=float)  # [nimg, 3], (0, 0, 0) first
        efrac = frac[None] + images[:, None]  # [nimg, nloc, 3]
        keep = np.all((efrac > -margin) & (efrac < 1 + margin), axis=-1)
        img_idx, atom_idx = np.nonzero(keep)  # image-major: the zero image (all locals) comes first
        ext = efrac[img_idx, atom_idx] @ box
        mapping = atom_idx
        shift = images[img_idx] - wrap[atom_idx]
        coord = frac @ box
    tree = cKDTree(ext)
    sdm = cKDTree(coord).sparse_distance_matrix(tree, rcut, output_type="ndarray")
    i, j, d = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64), sdm["v"]
    keep = (i != j) & (d < rcut)
    return Pairs(i[keep], j[keep], d[keep], np.asarray(mapping, dtype=np.int64), shift)


def neighbor_counts(pairs: Pairs, atype: np.ndarray, nloc: int, ntypes: int, rcut: float) -> np.ndarray:
    """[nloc, ntypes] number of neighbours of each type within rcut."""
    m = pairs.d < rcut
    tj = atype[pairs.mapping[pairs.j[m]]]
    counts = np.zeros((nloc, ntypes), dtype=np.int64)
    np.add.at(counts, (pairs.i[m], tj), 1)
    return counts


def _fill(pairs: Pairs, atype: np.ndarray, nloc: int, req: NlistRequest, truncate: bool) -> np.ndarray:
    m = pairs.d < req.rcut
    i, j, d = pairs.i[m], pairs.j[m], pairs.d[m]
    nlist = np.full((nloc, req.nnei), -1, dtype=np.int64)
    if len(i) == 0:
        return nlist
    if req.mixed:
        group = np.zeros_like(i)
        offsets, sel = np.zeros(1, dtype=np.int64), np.asarray(req.sel)
    else:
        group = atype[pairs.mapping[j]]
        sel = np.asarray(req.sel)
        offsets = np.concatenate([[0], np.cumsum(sel)[:-1]])
    order = np.lexsort((d, group, i))  # by centre, then block, then distance
    i, j, group = i[order], j[order], group[order]
    key = i * (len(sel) + 1) + group
    start = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
    rank = np.arange(len(key)) - np.repeat(start, np.diff(np.r_[start, len(key)]))
    over = rank >= sel[group]
    if over.any() and not truncate:
        atom = int(i[over][0])
        counts = np.bincount(group[i == atom], minlength=len(sel))
        raise NeighborOverflow(atom, counts, req.sel)
    ok = ~over
    nlist[i[ok], offsets[group[ok]] + rank[ok]] = j[ok]
    return nlist


def build_graph(
    coord: np.ndarray,  # [nloc, 3]
    box: np.ndarray | None,  # [3, 3] or None (non-periodic)
    atype: np.ndarray,  # [nloc] int, >= 0
    requests: list[NlistRequest],
    truncate: bool = False,
    pairs: Pairs | None = None,
) -> FrameGraph:
    nloc = len(coord)
    rcut = max(r.rcut for r in requests)
    pairs = pairs if pairs is not None else find_pairs(coord, box, rcut)
    nlists = [_fill(pairs, atype, nloc, req, truncate) for req in requests]
    # keep only the ghosts that some list uses, locals first and in order
    used = np.unique(np.concatenate([n[n >= nloc] for n in nlists] + [np.zeros(0, dtype=np.int64)]))
    keep = np.concatenate([np.arange(nloc), used])
    remap = np.full(len(pairs.mapping), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    nlists = [np.where(n >= 0, remap[np.maximum(n, 0)], -1) for n in nlists]
    return FrameGraph(pairs.mapping[keep], pairs.shift[keep], nlists)


# ----------------------------------------------------------------------------- batches


@dataclass
class BatchGraph:
    """Neighbour graph of a padded batch; per frame the extended layout is [nloc (padded) locals | ghosts].

        coord_ext[f] = coord[f][mapping[f]] + shift[f] @ box[f]
    """

    mapping: torch.Tensor  # [nf, nall] long, extended -> local (padded local slots map to themselves)
    shift: torch.Tensor  # [nf, nall, 3] coord's dtype, integer image vectors
    nlists: list[torch.Tensor]  # each [nf, nloc, nnei] long into the extended atoms, -1 empty


