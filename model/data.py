"""Datasets: any dpdata format -> validated numpy frames -> padded torch batches.

deepmd/npy and deepmd/raw are read natively (precise errors: file, frame, shape); every other
dpdata format (vasp/outcar, extxyz, ...) goes through dpdata. Elements are mapped onto the
model's type map by name. Every problem is a `DataError` naming the system and frame.

Glossary (shapes, units):
    coord   [nframes, natoms, 3]  Angstrom
    box     [nframes, 3, 3]       Angstrom, rows are cell vectors; None when non-periodic (nopbc)
    atype   [natoms]              int, index into the model type_map
    energy  [nframes]             eV
    force   [nframes, natoms, 3]  eV/Angstrom
    virial  [nframes, 9]          eV, deepmd sign (virial = -stress * volume)
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .neighbor import FrameGraph, NeighborOverflow, NlistRequest, build_graph, find_pairs, neighbor_counts

LABELS = ("energy", "force", "virial")
MULTI_FORMATS = {"extxyz", "quip/gap/xyz", "xyz", "ase/structure"}


@dataclass
class System:
    name: str
    elements: list[str]  # element of each type index used in `atype` (the model type map)
    atype: np.ndarray  # [natoms]
    coord: np.ndarray  # [nframes, natoms, 3]
    box: np.ndarray | None  # [nframes, 3, 3] or None
    energy: np.ndarray | None = None  # [nframes]
    force: np.ndarray | None = None  # [nframes, natoms, 3]
    virial: np.ndarray | None = None  # [nframes, 9]

    @property
    def nframes(self) -> int:
        return self.coord.shape[0]

    @property
    def natoms(self) -> int:
        return self.coord.shape[1]

    @property
    def pbc(self) -> bool:
        return self.box is not None

    def subset(self, idx) -> "System":
        idx = np.asarray(idx)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return System(self.name, self.elements, self.atype, self.coord[idx], pick(self.box),
                      pick(self.energy), pick(self.force), pick(self.virial))

    def counts(self, ntypes: int) -> np.ndarray:
        """[ntypes] number of atoms of each type."""
        return np.bincount(self.atype, minlength=ntypes)


# ----------------------------------------------------------------------------- reading


def find_systems(path: str | os.PathLike) -> list[Path]:
    """A folder with type.raw is one system; otherwise every such folder below it."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if (p / "type.raw").is_file():
        return [p]
    found = sorted({Path(f).parent for f in glob.glob(str(p / "**" / "type.raw"), recursive=True)})
    if not found:
        raise DataError(f"{p}: no system found (no type.raw below it; for other formats give fmt)")
    return found


def _npy(path: Path, name: str) -> np.ndarray | None:
    f = path / f"{name}.npy"
    if not f.is_file():
        return None
    try:
        return np.load(f, allow_pickle=False)
    except Exception as e:  # corrupt file
        raise DataError(f"{f}: cannot read: {e}") from None


def _read_deepmd_npy(path: Path) -> dict:
    sets = sorted(path.glob("set.*"))
    if not sets:
        raise DataError(f"{path}: empty system (no set.* folders)")
    parts: dict[str, list] = {k: [] for k in ("coord", "box", "energy", "force", "virial")}
    for s in sets:
        for k in parts:
            a = _npy(s, k)
            parts[k].append(a)
    out = {}
    for k, arrs in parts.items():
        present = [a is not None for a in arrs]
        if any(present) and not all(present):
            missing = [str(s.name) for s, ok in zip(sets, present) if not ok]
            raise DataError(f"{path}: {k}.npy missing in {', '.join(missing)} but present in other sets")
        out[k] = [np.asarray(a, dtype=np.float64) for a in arrs] if all(present) else None
    return out


def _read_deepmd_raw(path: Path) -> dict:
    out = {}
    for k in ("coord", "box", "energy", "force", "virial"):
        f = path / f"{k}.raw"
        if not f.is_file():
            out[k] = None
            continue
        try:
            a = np.loadtxt(f, ndmin=2, dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{f}: cannot parse: {e}") from None
        out[k] = [a]
    return out


def _per_frame(path: Path, key: str, arrs: list[np.ndarray] | None, width: int, nframes: int | None) -> np.ndarray | None:
    if arrs is None:
        return None
    a = np.concatenate([x.reshape(0, width) if x.size == 0 else x.reshape(len(x), -1) for x in arrs], axis=0)
    if a.shape[1] != width:
        raise DataError(f"{path}: {key} has {a.shape[1]} values per frame, expected {width}")
    if nframes is not None and a.shape[0] != nframes:
        raise DataError(f"{path}: {key} has {a.shape[0]} frames, coord has {nframes}")
    return a


def _read_native(path: Path, fmt: str) -> tuple[list[str], np.ndarray, dict, bool]:
    tfile = path / "type.raw"
    try:
        types = np.loadtxt(tfile, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{tfile}: cannot parse: {e}") from None
    mfile = path / "type_map.raw"
    names = mfile.read_text().split() if mfile.is_file() else None
    if names is None:
        raise DataError(f"{path}: type_map.raw missing (element names are needed to map onto the model type map)")
    if len(types) == 0:
        raise DataError(f"{path}: empty system (type.raw lists no atoms)")
    if types.min() < 0 or types.max() >= len(names):
        raise DataError(f"{tfile}: type index {types.max()} outside type_map.raw {names}")
    raw = _read_deepmd_npy(path) if fmt == "deepmd/npy" else _read_deepmd_raw(path)
    nopbc = (path / "nopbc").exists()
    return names, types, raw, nopbc


def _read_dpdata(path: Path, fmt: str, labeled: bool) -> list[tuple[str, list[str], np.ndarray, dict, bool]]:
    import dpdata

    try:
        if fmt in MULTI_FORMATS:  # one file, many frames / compositions
            ms = dpdata.MultiSystems.from_file(str(path), fmt=fmt, labeled=labeled) if labeled else dpdata.MultiSystems.from_file(str(path), fmt=fmt)
            systems = list(ms.systems.values())
        else:
            systems = [dpdata.LabeledSystem(str(path), fmt=fmt) if labeled else dpdata.System(str(path), fmt=fmt)]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: dpdata cannot read it as {fmt}: {type(e).__name__}: {e}") from None
    out = []
    for k, s in enumerate(systems):
        d = s.data
        nf = len(d["coords"])
        raw = {
            "coord": [np.asarray(d["coords"], dtype=np.float64)],
            "box": None if d.get("nopbc", False) else [np.asarray(d["cells"], dtype=np.float64)],
            "energy": [np.asarray(d["energies"], dtype=np.float64).reshape(nf, -1)] if "energies" in d else None,
            "force": [np.asarray(d["forces"], dtype=np.float64)] if "forces" in d else None,
            "virial": [np.asarray(d["virials"], dtype=np.float64)] if "virials" in d else None,
        }
        name = str(path) if len(systems) == 1 else f"{path}[{k}:{s.formula}]"
        out.append((name, list(d["atom_names"]), np.asarray(d["atom_types"]), raw, bool(d.get("nopbc", False))))
    return out


def detect_format(path: Path) -> str:
    if path.is_dir():
        if list(path.glob("set.*")):
            return "deepmd/npy"
        if (path / "coord.raw").is_file():
            return "deepmd/raw"
        raise DataError(f"{path}: neither deepmd/npy (set.*) nor deepmd/raw (coord.raw); give fmt")
    name = path.name.lower()
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if "outcar" in name:
        return "vasp/outcar"
    raise DataError(f"{path}: cannot guess the format; give fmt (any dpdata format)")


def load_system(path: str | os.PathLike, type_map: list[str], fmt: str = "auto", labeled: bool = True,
                check_finite: bool = True) -> list[System]:
    """Read one path (which may hold several systems) and map its elements onto `type_map`.
    `check_finite=False` keeps NaN/inf values (the data cleaner drops such frames itself)."""
    path = Path(path)
    f = detect_format(path) if fmt == "auto" else fmt
    if f in ("deepmd/npy", "deepmd/raw", "deepmd", "npy"):
        f = "deepmd/raw" if f == "deepmd/raw" else "deepmd/npy"
        names, types, raw, nopbc = _read_native(path, f)
        items = [(str(path), names, types, raw, nopbc)]
    else:
        items = _read_dpdata(path, f, labeled)
    return [_validate(*it, type_map=type_map, labeled=labeled, check_finite=check_finite) for it in items]


def _validate(name: str, names: list[str], types: np.ndarray, raw: dict, nopbc: bool, *, type_map: list[str], labeled: bool,
              check_finite: bool = True) -> System:
    missing = sorted({names[t] for t in np.unique(types)} - set(type_map))
    if missing:
        raise DataError(f"{name}: element(s) {', '.join(missing)} not in the model type map {type_map}")
    lut = np.array([type_map.index(n) if n in type_map else -1 for n in names])
    atype = lut[types]
    natoms = len(types)
    if raw["coord"] is None:
        raise DataError(f"{name}: no coordinates (coord.npy / coord.raw missing)")
    coord = _per_frame(Path(name), "coord", raw["coord"], natoms * 3, None)
    nf = coord.shape[0]
    if nf == 0:
        raise DataError(f"{name}: empty system (0 frames)")
    box = None if nopbc else _per_frame(Path(name), "box", raw["box"], 9, nf)
    if box is None and not nopbc:
        raise DataError(f"{name}: box missing and no 'nopbc' marker")
    energy = _per_frame(Path(name), "energy", raw["energy"], 1, nf)
    force = _per_frame(Path(name), "force", raw["force"], natoms * 3, nf)
    virial = _per_frame(Path(name), "virial", raw["virial"], 9, nf)
    if labeled and energy is None and force is None:
        raise DataError(f"{name}: no labels (energy and force both missing)")
    arrays = {"coord": coord, "box": box, "energy": energy, "force": force, "virial": virial}
    for key, a in arrays.items():
        if a is None or not check_finite:
            continue
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            k = int(np.nonzero(bad)[0][0])
            what = "NaN" if np.isnan(a[k]).any() else "inf"
            raise DataError(f"{name} frame {k}: {key} contains {what}" + (f" ({int(bad.sum())} bad frames)" if bad.sum() > 1 else ""))
    if box is not None:
        vol = np.linalg.det(box.reshape(nf, 3, 3))
        if (np.abs(vol) < 1e-6).any():
            k = int(np.nonzero(np.abs(vol) < 1e-6)[0][0])
            raise DataError(f"{name} frame {k}: degenerate cell (volume {vol[k]:.3g})")
    return System(
        name=name,
        elements=list(type_map),
        atype=atype,
        coord=coord.reshape(nf, natoms, 3),
        box=None if box is None else box.reshape(nf, 3, 3),
        energy=None if energy is None else energy[:, 0],
        force=None if force is None else force.reshape(nf, natoms, 3),
        virial=virial,
    )


def load_systems(paths: list[str] | str, type_map: list[str], fmt: str = "auto", labeled: bool = True,
                 check_finite: bool = True) -> list[System]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    out = []
    for p in paths:
        for sp in find_systems(p) if fmt in ("auto", "deepmd/npy", "deepmd/raw") else [Path(p)]:
            out.extend(load_system(sp, type_map, fmt, labeled, check_finite))
    if not out:
        raise DataError(f"{paths}: no systems")
    return out


def elements_in(paths: list[str] | str, fmt: str = "auto") -> list[str]:
    """Element names present in the data, in order of first appearance (for a default type map)."""
    seen: list[str] = []
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    for p in paths:
        for sp in find_systems(p) if fmt in ("auto", "deepmd/npy", "deepmd/raw") else [Path(p)]:
            f = detect_format(sp) if fmt == "auto" else fmt
            if f in ("deepmd/npy", "deepmd/raw"):
                names, types, _, _ = _read_native(sp, f)
                present = [names[t] for t in sorted(set(types.tolist()))]
            else:
                present = [n for it in _read_dpdata(sp, f, False) for n in it[1]]
            for n in map(str, present):  # several dpdata systems in one file repeat their names
                if n not in seen:
                    seen.append(n)
    return seen


# ----------------------------------------------------------------------------- neighbours


def auto_sel(max_counts: np.ndarray, ratio: float = 1.1) -> list[int]:
    """deepmd-kit's `sel: auto`: max neighbour count * ratio, rounded up to a multiple of 4 (at least 4)."""
    return [max(4, int(np.ceil(np.ceil(c * ratio) / 4.0) * 4)) for c in max_counts]


def max_neighbor_counts(systems: list[System], rcut: float, ntypes: int) -> tuple[np.ndarray, np.ndarray]:
    """([ntypes] max neighbours of each type, scalar max total) over all frames."""
    per_type = np.zeros(ntypes, dtype=np.int64)
    total = 0
    for s in systems:
        for k in range(s.nframes):
            c = neighbor_counts(find_pairs(s.coord[k], None if s.box is None else s.box[k], rcut), s.atype, s.natoms, ntypes, rcut)
            per_type = np.maximum(per_type, c.max(axis=0))
            total = max(total, int(c.sum(axis=1).max()))
    return per_type, np.int64(total)


def min_neighbor_distance(systems: list[System], rcut: float) -> float:
    best = np.inf
    for s in systems:
        for k in range(s.nframes):
            p = find_pairs(s.coord[k], None if s.box is None else s.box[k], rcut)
            if len(p.d):
                best = min(best, float(p.d.min()))
    return best


def frame_graph(s: System, k: int, requests: list[NlistRequest], truncate: bool = False) -> FrameGraph:
    try:
        return build_graph(s.coord[k], None if s.box is None else s.box[k], s.atype, requests, truncate=truncate)
    except NeighborOverflow as e:
        raise DataError(
            f"{s.name} frame {k}: atom {e.atom} has {e.counts.tolist()} neighbours within rcut "
            f"but sel is {list(e.sel)}; raise sel or use sel: auto"
        ) from None


# ----------------------------------------------------------------------------- batches


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
    """Pad frames (possibly of different systems and sizes) into one batch."""
    nf = len(items)
    nloc = max(s.natoms for s, _, _ in items)
    nghost = max(g.nall - s.natoms for s, _, g in items)
    nall = nloc + nghost
    nreq = len(items[0][2].nlists)
    coord = np.zeros((nf, nloc, 3))
    atype = np.full((nf, nloc), -1, dtype=np.int64)
    box = np.zeros((nf, 3, 3))
    mapping = np.zeros((nf, nall), dtype=np.int64)
    shift = np.zeros((nf, nall, 3))
    nlists = [np.full((nf, nloc, items[0][2].nlists[r].shape[1]), -1, dtype=np.int64) for r in range(nreq)]
    natoms = np.zeros(nf, dtype=np.int64)
    labels = {k: [] for k in LABELS}
    for f, (s, k, g) in enumerate(items):
        n, ng = s.natoms, g.nall - s.natoms
        coord[f, :n] = s.coord[k]
        atype[f, :n] = s.atype
        if s.box is not None:
            box[f] = s.box[k]
        # extended layout per frame: [nloc padded locals | ghosts]
        mapping[f, :nloc] = np.arange(nloc)  # padded local slots map to themselves (atype -1)
        shift[f, :n] = g.shift[:n]  # locals are wrapped into the cell, ghosts are images of wrapped atoms
        mapping[f, nloc : nloc + ng] = g.mapping[n:]
        shift[f, nloc : nloc + ng] = g.shift[n:]
        for r in range(nreq):
            nl = g.nlists[r]
            nlists[r][f, :n] = np.where(nl >= n, nl - n + nloc, nl)
        natoms[f] = n
        labels["energy"].append(None if s.energy is None else s.energy[k])
        labels["force"].append(None if s.force is None else np.pad(s.force[k], ((0, nloc - n), (0, 0))))
        labels["virial"].append(None if s.virial is None else s.virial[k])
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    out = Batch(t(coord), torch.as_tensor(atype), t(box) if any(s.box is not None for s, _, _ in items) else None,
                torch.as_tensor(mapping), t(shift), [torch.as_tensor(n) for n in nlists], torch.as_tensor(natoms))
    for key, vals in labels.items():
        have = [v is not None for v in vals]
        out.find[key] = float(all(have))
        if all(have):
            setattr(out, key, t(np.stack(vals)))
    return out


class DataSet:
    """Systems with their neighbour graphs computed once; random batches as deepmd-kit draws them:
    a system with probability proportional to its number of batches, then frames without
    replacement from that system's shuffled order. The sampler state is saved in checkpoints so a
    restarted run draws the same batches."""

    def __init__(self, systems: list[System], requests: list[NlistRequest], batch_size: int | str, dtype: torch.dtype,
                 truncate: bool = False):
        self.systems = systems
        self.requests = requests
        self.dtype = dtype
        self.graphs = [[frame_graph(s, k, requests, truncate) for k in range(s.nframes)] for s in systems]
        self.batch_sizes = [resolve_batch_size(batch_size, s.natoms) for s in systems]
        self.set_batch_sizes(self.batch_sizes)

    def set_batch_sizes(self, batch_sizes: list[int]) -> None:
        """Batch size per system; resets the system probabilities and the shuffled orders."""
        self.batch_sizes = list(batch_sizes)
        nbatch = np.array([max(1, s.nframes // b) for s, b in zip(self.systems, self.batch_sizes)], dtype=float)
        self.prob = nbatch / nbatch.sum()
        self.order: list[np.ndarray] = [np.arange(s.nframes) for s in self.systems]
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

    def frames(self, i: int, ks) -> Batch:
        return collate([(self.systems[i], k, self.graphs[i][k]) for k in ks], self.dtype)

    def sample(self, rng: np.random.Generator) -> Batch:
        return self.frames(*self.draw(rng))

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
