"""Frames -> padded torch batches with their neighbour lists, the per-split DataSet that draws
them, and the neighbour statistics of a set of systems (sel: auto, min_nbor_dist, overlaps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lamflow.model.data.batch_neighbors import batch_graph
from lamflow.model.data.neighbor import FrameGraph, NeighborOverflow, NlistRequest, build_graph, find_pairs, neighbor_counts
from lamflow.model.data.systems import LABELS, OVERLAP, System
from lamflow.model.errors import DataError


def auto_sel(max_counts: np.ndarray, ratio: float = 1.1) -> list[int]:
    """deepmd-kit's `sel: auto`: max neighbour count * ratio, rounded up to a multiple of 4 (at least 4)."""
    return [max(4, int(np.ceil(np.ceil(c * ratio) / 4.0) * 4)) for c in max_counts]


def _frames_of(systems: list[System], frames: list | None):
    for i, s in enumerate(systems):
        for k in (range(s.nframes) if frames is None else frames[i]):
            yield s, int(k)


def max_neighbor_counts(systems: list[System], rcut: float, ntypes: int, frames: list | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """([ntypes] max neighbours of each type, scalar max total) over all frames, or over
    `frames` (per system, the frame indices of a sample)."""
    per_type = np.zeros(ntypes, dtype=np.int64)
    total = 0
    for s, k in _frames_of(systems, frames):
        c = neighbor_counts(find_pairs(s.coord[k], None if s.box is None else s.box[k], rcut), s.atype, s.natoms, ntypes, rcut)
        per_type = np.maximum(per_type, c.max(axis=0))
        total = max(total, int(c.sum(axis=1).max()))
    return per_type, np.int64(total)


def min_neighbor_distance(systems: list[System], rcut: float, frames: list | None = None) -> float:
    best = np.inf
    for s, k in _frames_of(systems, frames):
        p = find_pairs(s.coord[k], None if s.box is None else s.box[k], rcut)
        if len(p.d):
            best = min(best, float(p.d.min()))
    return best


def overlap_error(name: str, frame: int, i: int, j: int, d: float) -> DataError:
    return DataError(f"{name} frame {frame}: atoms {i} and {j} are {d:.3g} A apart (on top of each other; "
                     f"remove the frame, e.g. with lamflow clean)")


def frame_graph(s: System, k: int, requests: list[NlistRequest], truncate: bool = False) -> FrameGraph:
    try:
        return build_graph(s.coord[k], None if s.box is None else s.box[k], s.atype, requests, truncate=truncate)
    except NeighborOverflow as e:
        raise overflow_error(s.name, k, e) from None


def overflow_error(name: str, frame: int, e: NeighborOverflow) -> DataError:
    return DataError(f"{name} frame {frame}: atom {e.atom} has {np.asarray(e.counts).tolist()} neighbours within rcut "
                     f"but sel is {list(e.sel)}; raise sel or use sel: auto")


@dataclass
class Batch:
    """Frames padded to a common size; padded atoms have atype -1 and take part in nothing."""

    coord: torch.Tensor  # [nf, nloc, 3]
    atype: torch.Tensor  # [nf, nloc]      -1 = padding
    box: torch.Tensor | None  # [nf, 3, 3]   None when no frame is periodic (zeros for non-periodic frames in a mixed batch)
    mapping: torch.Tensor  # [nf, nall]    extended -> local
    shift: torch.Tensor  # [nf, nall, 3]   image vectors: coord_ext = coord[mapping] + shift @ box
    nlists: list[torch.Tensor]  # each [nf, nloc, nnei]
    natoms: torch.Tensor  # [nf]          real atoms per frame
    energy: torch.Tensor | None = None  # [nf]
    force: torch.Tensor | None = None  # [nf, nloc, 3]
    virial: torch.Tensor | None = None  # [nf, 9]
    find: dict = field(default_factory=dict)  # label -> 1.0 / 0.0, as deepmd-kit's find_*

    @property
    def nframes(self) -> int:
        return self.coord.shape[0]

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(mv(self.coord), mv(self.atype), mv(self.box), mv(self.mapping), mv(self.shift),
                     [mv(n) for n in self.nlists], mv(self.natoms), mv(self.energy), mv(self.force), mv(self.virial), dict(self.find))


def collate(items: list[tuple[System, int, FrameGraph]], dtype: torch.dtype) -> Batch:
    """Pad frames with precomputed graphs (possibly of different systems and sizes) into one batch
    (inference and tests; training builds the graph per batch, `make_batch`)."""
    nf = len(items)
    nloc = max(s.natoms for s, _, _ in items)
    nghost = max(g.nall - s.natoms for s, _, g in items)
    nall = nloc + nghost
    nreq = len(items[0][2].nlists)
    mapping = np.zeros((nf, nall), dtype=np.int64)
    shift = np.zeros((nf, nall, 3))
    nlists = [np.full((nf, nloc, items[0][2].nlists[r].shape[1]), -1, dtype=np.int64) for r in range(nreq)]
    for f, (s, k, g) in enumerate(items):
        n, ng = s.natoms, g.nall - s.natoms
        # extended layout per frame: [nloc padded locals | ghosts]
        mapping[f, :nloc] = np.arange(nloc)  # padded local slots map to themselves (atype -1)
        shift[f, :n] = g.shift[:n]  # locals are wrapped into the cell, ghosts are images of wrapped atoms
        mapping[f, nloc : nloc + ng] = g.mapping[n:]
        shift[f, nloc : nloc + ng] = g.shift[n:]
        for r in range(nreq):
            nl = g.nlists[r]
            nlists[r][f, :n] = np.where(nl >= n, nl - n + nloc, nl)
    raw = pad_frames([(s, k) for s, k, _ in items], dtype)
    return Batch(raw.coord, raw.atype, raw.box, torch.as_tensor(mapping), torch.as_tensor(shift, dtype=dtype),
                 [torch.as_tensor(n) for n in nlists], raw.natoms, raw.energy, raw.force, raw.virial, dict(raw.find))


@dataclass
class RawBatch:
    """Padded frames before the neighbour graph: what a DataLoader worker makes (reads and pads)."""

    coord: torch.Tensor  # [nf, nloc, 3]
    atype: torch.Tensor  # [nf, nloc]      -1 = padding
    box: torch.Tensor | None  # [nf, 3, 3]   None when no frame is periodic
    pbc: torch.Tensor  # [nf] bool
    natoms: torch.Tensor  # [nf]
    energy: torch.Tensor | None = None
    force: torch.Tensor | None = None
    virial: torch.Tensor | None = None
    find: dict = field(default_factory=dict)
    where: list = field(default_factory=list)  # [(system name, frame)] per row, for error messages
    task: int = 0  # which training task drew it (multi-task)

    def _map(self, fn) -> "RawBatch":
        mv = lambda t: None if t is None else fn(t)  # noqa: E731
        return RawBatch(mv(self.coord), mv(self.atype), mv(self.box), mv(self.pbc), mv(self.natoms), mv(self.energy),
                        mv(self.force), mv(self.virial), dict(self.find), list(self.where), self.task)

    def to(self, device, non_blocking: bool = False) -> "RawBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RawBatch":  # DataLoader(pin_memory=True) calls this
        return self._map(lambda t: t.pin_memory())


def pad_frames(items: list[tuple[System, int]], dtype: torch.dtype) -> RawBatch:
    """Read frames (possibly of different systems and sizes) and pad them into one batch."""
    nf = len(items)
    nloc = max(s.natoms for s, _ in items)
    coord = np.zeros((nf, nloc, 3))
    atype = np.full((nf, nloc), -1, dtype=np.int64)
    box = np.zeros((nf, 3, 3))
    pbc = np.zeros(nf, dtype=bool)
    natoms = np.zeros(nf, dtype=np.int64)
    labels = {k: [] for k in LABELS}
    for f, (s, k) in enumerate(items):
        n = s.natoms
        coord[f, :n] = s.coord[k]
        atype[f, :n] = s.atype
        if s.box is not None:
            box[f], pbc[f] = s.box[k], True
        natoms[f] = n
        labels["energy"].append(None if s.energy is None else s.energy[k])
        labels["force"].append(None if s.force is None else np.pad(s.force[k], ((0, nloc - n), (0, 0))))
        labels["virial"].append(None if s.virial is None else s.virial[k])
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    out = RawBatch(t(coord), torch.as_tensor(atype), t(box) if pbc.any() else None, torch.as_tensor(pbc),
                   torch.as_tensor(natoms), where=[(s.name, int(k)) for s, k in items])
    for key, vals in labels.items():
        have = [v is not None for v in vals]
        out.find[key] = float(all(have))
        if all(have):
            setattr(out, key, t(np.stack(vals)))
    return out


def make_batch(raw: RawBatch, requests: list[NlistRequest], truncate: bool = False) -> Batch:
    """The neighbour graph of a padded batch, built where its tensors are (the training device).
    More neighbours than sel, or two atoms on top of each other, is a DataError naming the frame."""
    try:
        g = batch_graph(raw.coord, raw.atype, raw.box, raw.pbc, requests, truncate)
    except NeighborOverflow as e:
        name, k = raw.where[e.frame or 0]
        raise overflow_error(name, k, e) from None
    check_overlap(raw, g.mapping, g.shift, g.nlists[0], requests[0])
    return Batch(raw.coord, raw.atype, raw.box, g.mapping, g.shift, g.nlists, raw.natoms, raw.energy, raw.force,
                 raw.virial, dict(raw.find))


def check_overlap(raw: RawBatch, mapping: torch.Tensor, shift: torch.Tensor, nlist: torch.Tensor, req: NlistRequest) -> None:
    """Distance from every atom to its nearest listed neighbour (slot 0 of each block: the lists
    are sorted by distance) must exceed OVERLAP."""
    first = [0] if req.mixed else np.concatenate([[0], np.cumsum(req.sel)[:-1]]).tolist()
    nl = nlist[:, :, first]  # [nf, nloc, nblock]
    nf, nloc = raw.atype.shape
    ext = torch.gather(raw.coord, 1, mapping.unsqueeze(-1).expand(-1, -1, 3))  # [nf, nall, 3]
    if raw.box is not None:
        ext = ext + torch.bmm(shift, raw.box)
    j = nl.clamp(min=0).reshape(nf, -1)
    xj = torch.gather(ext, 1, j.unsqueeze(-1).expand(-1, -1, 3)).reshape(nf, nloc, len(first), 3)
    d = torch.linalg.vector_norm(xj - ext[:, :nloc, None], dim=-1)
    d = torch.where(nl >= 0, d, torch.full_like(d, np.inf))
    if bool((d < OVERLAP).any()):
        f, i, b = (int(x) for x in torch.nonzero(d < OVERLAP)[0])
        name, k = raw.where[f]
        raise overlap_error(name, k, i, int(mapping[f, nl[f, i, b]]), float(d[f, i, b]))


class DataSet:
    """Systems indexed on disk; random batches as deepmd-kit draws them: a system with probability
    proportional to its number of batches, then frames without replacement from that system's
    shuffled order. Only the sampler's state (one permutation per system) is held; the sampler
    state is saved in checkpoints so a restarted run draws the same batches."""

    def __init__(self, systems: list[System], requests: list[NlistRequest], batch_size: int | str, dtype: torch.dtype,
                 truncate: bool = False):
        self.systems = systems
        self.requests = requests
        self.dtype = dtype
        self.truncate = truncate
        self.batch_sizes = [resolve_batch_size(batch_size, s.natoms) for s in systems]
        self.set_batch_sizes(self.batch_sizes)

    def set_batch_sizes(self, batch_sizes: list[int]) -> None:
        """Batch size per system; resets the system probabilities and the shuffled orders."""
        self.batch_sizes = list(batch_sizes)
        nbatch = np.array([max(1, s.nframes // b) for s, b in zip(self.systems, self.batch_sizes)], dtype=float)
        self.prob = nbatch / nbatch.sum()
        self.order: list[np.ndarray] = [np.arange(0) for _ in self.systems]
        self.cursor = [s.nframes for s in self.systems]  # exhausted: reshuffle on first draw

    @property
    def nframes(self) -> int:
        return sum(s.nframes for s in self.systems)

    def draw(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        """A system (probability proportional to its batches) and a batch of its frames."""
        i = int(rng.choice(len(self.systems), p=self.prob))
        n, b = self.systems[i].nframes, self.batch_sizes[i]
        picks = []
        while len(picks) < min(b, n):
            if self.cursor[i] >= n:
                self.order[i] = rng.permutation(n)
                self.cursor[i] = 0
            picks.append(int(self.order[i][self.cursor[i]]))
            self.cursor[i] += 1
        return i, picks

    def pick(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        """The frames this process trains on next (a DDP shard keeps its share of the draw)."""
        return self.draw(rng)

    def raw(self, i: int, ks) -> RawBatch:
        return pad_frames([(self.systems[i], int(k)) for k in ks], self.dtype)

    def frames(self, i: int, ks, device=None) -> Batch:
        raw = self.raw(i, ks)
        return make_batch(raw if device is None else raw.to(device), self.requests, self.truncate)

    def sample(self, rng: np.random.Generator) -> Batch:
        return self.frames(*self.pick(rng))

    def batches(self, max_frames: int | None = None, batch_size: int | None = None):
        """Every frame once, in order, system by system (for evaluation and statistics)."""
        left = max_frames
        for i, s in enumerate(self.systems):
            b = batch_size or self.batch_sizes[i]
            n = s.nframes if left is None else min(s.nframes, left)
            for start in range(0, n, b):
                ks = range(start, min(start + b, n))
                yield i, self.frames(i, ks)
            if left is not None:
                left -= n
                if left <= 0:
                    return

    def state(self) -> dict:
        return {"order": [torch.as_tensor(o) for o in self.order], "cursor": list(self.cursor)}

    def load_state(self, st: dict) -> None:
        self.order = [o.numpy() for o in st["order"]]
        self.cursor = list(st["cursor"])


def resolve_batch_size(bs: int | str, natoms: int) -> int:
    """int, "auto" (deepmd-kit: smallest batch with >= 32 atoms) or "auto:N"."""
    if isinstance(bs, int):
        return bs
    if bs == "auto" or bs.startswith("auto:"):
        target = 32 if bs == "auto" else int(bs.split(":")[1])
        return max(1, int(np.ceil(target / natoms)))
    raise DataError(f"batch_size: expected an int, 'auto' or 'auto:N', got {bs!r}")
