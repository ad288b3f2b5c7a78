"""Datasets: any dpdata format -> indexed, memory-mapped frames -> padded torch batches.

deepmd/npy systems are indexed from their .npy headers alone: one memory map per `set.*` file,
frames counted across sets; a frame's arrays are read when its batch is made, so nothing per
frame lives in RAM. Every other format (deepmd/raw, vasp/outcar, extxyz, ... through dpdata) is
converted once into a deepmd/npy cache keyed by a hash of its content (`cache_dir()`:
$LAMFLOW_CACHE/data or ~/.cache/lamflow/data) and read from there by later runs. Elements are
mapped onto the model's type map by name. Validation (headers, shapes, elements, NaN/inf,
degenerate cells) streams over the files in chunks before any training; every problem is a
`DataError` naming the file or the system and frame.

`load_systems(..., lazy=True)` keeps the memory maps (training); the default reads the arrays
into memory (small data: cleaning, testing, distillation), same validation either way.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from lamflow.model.data.formats import _index_npy, _native, _read_types, converted, detect_format
from lamflow.model.errors import DataError

LABELS = ("energy", "force", "virial")
CHUNK_VALUES = 1 << 23  # values per chunk when validation streams over a file (64 MB of float64)
OVERLAP = 0.1  # Angstrom: two atoms closer than this are a broken frame


# ----------------------------------------------------------------------------- frames on disk


class FrameArray(NDArrayOperatorsMixin):
    """One per-frame array of a system, concatenated over its `set.*` files and read on demand.

    `parts` are .npy files or in-memory arrays. A C-ordered file is read by offset (os.pread: one
    read per frame, and the process's memory does not grow with the frames it has touched, as it
    would with a memory map, whose touched pages all count in RSS); `part(p)` is the memory map.
    Indexing returns float64 numpy arrays: `a[k]` one frame `frame_shape`, `a[idx]` stacked frames.
    Numpy functions see the whole array (read into memory): fine for small data only."""

    def __init__(self, parts: list, counts: list[int], frame_shape: tuple[int, ...]):
        self.parts, self.counts, self.frame_shape = list(parts), [int(c) for c in counts], tuple(frame_shape)
        self.width = int(np.prod(self.frame_shape, dtype=np.int64))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}

    def __getstate__(self):  # a worker process opens its own files (never pickle the data)
        d = dict(self.__dict__)
        d["_maps"], d["_fds"] = {}, {}
        return d

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def read(self, p: int, start: int, stop: int, keep_open: bool = True) -> np.ndarray:
        """Rows start:stop of part p, [stop - start, width] in the file's dtype, copied into memory.
        Up to MAX_OPEN files stay open per array (random reads); keep_open=False (a scan) closes it."""
        src = self.parts[p]
        if isinstance(src, np.ndarray) or src.fortran or self.counts[p] == 0:
            return np.array(self.part(p)[start:stop])
        fd = self._fds.pop(p, None)
        if fd is None:
            fd = os.open(src.path, os.O_RDONLY)
        try:
            row = self.width * src.dtype.itemsize
            buf = os.pread(fd, (stop - start) * row, src.offset + start * row)
        finally:
            if keep_open:
                self._fds[p] = fd  # most recently used last
                while len(self._fds) > self.MAX_OPEN:
                    os.close(self._fds.pop(next(iter(self._fds))))
            else:
                os.close(fd)
        if len(buf) < (stop - start) * row:
            raise DataError(f"{src.path}: truncated (rows {start}:{stop} cannot be read)")
        return np.frombuffer(buf, dtype=src.dtype).reshape(stop - start, self.width)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.offsets[-1]), *self.frame_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.frame_shape)

    dtype = np.dtype(np.float64)
    MAX_OPEN = 64  # open files per array (a system with many set.* folders stays under the fd limit)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part(self, p: int) -> np.ndarray:
        """[counts[p], width] in the file's dtype (a read-only memory map for a file)."""
        m = self._maps.get(p)
        if m is None:
            src = self.parts[p]
            if isinstance(src, np.ndarray):
                m = src
            elif self.counts[p] == 0:
                m = np.zeros((0, self.width))
            else:
                m = np.load(src.path, mmap_mode="r", allow_pickle=False)
            m = m.reshape(self.counts[p], self.width)
            self._maps[p] = m
        return m

    def rows(self, idx) -> np.ndarray:
        """[len(idx), width] float64 for frame indices idx."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.width), dtype=np.float64)
        p = np.searchsorted(self.offsets, idx, side="right") - 1
        for r, (q, k) in enumerate(zip(p.tolist(), (idx - self.offsets[p]).tolist())):
            out[r] = self.read(q, k, k + 1)[0]
        return out

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            k = int(key) + (n if key < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"frame {key} out of range for {n} frames")
            out = self.rows([k])[0].reshape(self.frame_shape)
        else:
            idx = np.arange(n)[key]
            out = self.rows(idx).reshape(len(idx), *self.frame_shape)
            rest = (slice(None), *rest) if rest else ()
        return out[rest] if rest else out

    def chunks(self):
        """(first frame, [m, width] raw-dtype block) over the whole array, in file order."""
        step = max(1, CHUNK_VALUES // max(1, self.width))
        for p in range(len(self.parts)):
            for s in range(0, self.counts[p], step):
                yield int(self.offsets[p]) + s, self.read(p, s, min(s + step, self.counts[p]), keep_open=False)

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate([np.asarray(b, dtype=np.float64) for _, b in self.chunks()] or [np.zeros((0, self.width))])
        a = a.reshape(self.shape)
        return a if dtype is None else a.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(x) if isinstance(x, FrameArray) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def reshape(self, *shape):
        return np.asarray(self).reshape(*shape)


@dataclass
class System:
    name: str
    elements: list[str]  # element of each type index used in `atype` (the model type map)
    atype: np.ndarray  # [natoms]
    coord: np.ndarray | FrameArray  # [nframes, natoms, 3]
    box: np.ndarray | FrameArray | None  # [nframes, 3, 3] or None
    energy: np.ndarray | FrameArray | None = None  # [nframes]
    force: np.ndarray | FrameArray | None = None  # [nframes, natoms, 3]
    virial: np.ndarray | FrameArray | None = None  # [nframes, 9]

    @property
    def nframes(self) -> int:
        return self.coord.shape[0]

    @property
    def natoms(self) -> int:
        return len(self.atype)

    @property
    def pbc(self) -> bool:
        return self.box is not None

    @property
    def lazy(self) -> bool:
        return isinstance(self.coord, FrameArray)

    def subset(self, idx) -> "System":
        """The frames idx, read into memory."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda a: None if a is None else np.asarray(a[idx], dtype=np.float64)  # noqa: E731
        return System(self.name, self.elements, self.atype, pick(self.coord), pick(self.box),
                      pick(self.energy), pick(self.force), pick(self.virial))

    def materialize(self) -> "System":
        """Every array in memory (float64)."""
        get = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
        return System(self.name, self.elements, self.atype, get(self.coord), get(self.box),
                      get(self.energy), get(self.force), get(self.virial))

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


def load_system(path: str | os.PathLike, type_map: list[str], fmt: str = "auto", labeled: bool = True,
                check_finite: bool = True, lazy: bool = False) -> list[System]:
    """Read one path (which may hold several systems) and map its elements onto `type_map`.
    `check_finite=False` keeps NaN/inf values (the data cleaner drops such frames itself).
    `lazy=True` keeps the arrays on disk (memory maps) and reads frames when asked."""
    path = Path(path)
    f = detect_format(path) if fmt == "auto" else fmt
    items = [(str(path), path)] if _native(f) == "deepmd/npy" else converted(path, _native(f) or f, labeled)
    out = [_open(name, d, type_map, labeled, check_finite) for name, d in items]
    return out if lazy else [s.materialize() for s in out]


def _open(name: str, path: Path, type_map: list[str], labeled: bool, check_finite: bool) -> System:
    names, types, nopbc = _read_types(path)
    missing = sorted({names[t] for t in np.unique(types)} - set(type_map))
    if missing:
        raise DataError(f"{name}: element(s) {', '.join(missing)} not in the model type map {type_map}")
    lut = np.array([type_map.index(n) if n in type_map else -1 for n in names])
    atype = lut[types]
    natoms = len(types)
    idx = _index_npy(path, natoms)
    if idx["coord"] is None:
        raise DataError(f"{name}: no coordinates (coord.npy / coord.raw missing)")
    shapes = {"coord": (natoms, 3), "box": (3, 3), "energy": (), "force": (natoms, 3), "virial": (9,)}
    arrays = {k: None if v is None else FrameArray(v[0], v[1], shapes[k]) for k, v in idx.items()}
    nf = len(arrays["coord"])
    if nf == 0:
        raise DataError(f"{name}: empty system (0 frames)")
    if nopbc:
        arrays["box"] = None
    elif arrays["box"] is None:
        raise DataError(f"{name}: box missing and no 'nopbc' marker")
    if labeled and arrays["energy"] is None and arrays["force"] is None:
        raise DataError(f"{name}: no labels (energy and force both missing)")
    if check_finite:
        for key, a in arrays.items():
            if a is not None:
                _check_finite(name, key, a)
    if arrays["box"] is not None:
        for start, block in arrays["box"].chunks():
            vol = np.linalg.det(np.asarray(block, dtype=np.float64).reshape(-1, 3, 3))
            small = np.nonzero(np.abs(vol) < 1e-6)[0]
            if len(small):
                k = int(small[0])
                raise DataError(f"{name} frame {start + k}: degenerate cell (volume {vol[k]:.3g})")
    return System(name, list(type_map), atype, arrays["coord"], arrays["box"], arrays["energy"], arrays["force"],
                  arrays["virial"])


def _check_finite(name: str, key: str, a: FrameArray) -> None:
    """First frame with NaN/inf (and how many), streaming over the files in chunks."""
    first, what, nbad = None, "", 0
    for start, block in a.chunks():
        if block.dtype.kind != "f":
            continue
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            if first is None:
                k = int(np.nonzero(bad)[0][0])
                first, what = start + k, "NaN" if np.isnan(block[k]).any() else "inf"
            nbad += int(bad.sum())
    if first is not None:
        raise DataError(f"{name} frame {first}: {key} contains {what}" + (f" ({nbad} bad frames)" if nbad > 1 else ""))


def load_systems(paths: list[str] | str, type_map: list[str], fmt: str = "auto", labeled: bool = True,
                 check_finite: bool = True, lazy: bool = False) -> list[System]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    out = []
    for p in paths:
        for sp in find_systems(p) if fmt in ("auto", "deepmd/npy", "deepmd/raw") else [Path(p)]:
            out.extend(load_system(sp, type_map, fmt, labeled, check_finite, lazy))
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
            if _native(f):
                names, types, _ = _read_types(sp)
                present = [names[t] for t in sorted(set(types.tolist()))]
            else:
                present = []
                for _, d in converted(sp, f, False):
                    names, types, _ = _read_types(d)
                    present += [names[t] for t in sorted(set(types.tolist()))]
            for n in map(str, present):  # several dpdata systems in one file repeat their names
                if n not in seen:
                    seen.append(n)
    return seen


# ----------------------------------------------------------------------------- neighbours


# ----------------------------------------------------------------------------- batches


