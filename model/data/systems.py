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
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.mixins import NDArrayOperatorsMixin

from lamflow.model.errors import DataError
from lamflow.model.data.neighbor import (FrameGraph, NeighborOverflow, NlistRequest, batch_graph, build_graph,
    find_pairs, neighbor_counts)

LABELS = ("energy", "force", "virial")
KEYS = ("coord", "box", "energy", "force", "virial")
MULTI_FORMATS = {"extxyz", "quip/gap/xyz", "xyz", "ase/structure"}
NPY_MAGIC = b"\x93NUMPY"
CHUNK_VALUES = 1 << 23  # values per chunk when validation streams over a file (64 MB of float64)
OVERLAP = 0.1  # Angstrom: two atoms closer than this are a broken frame
CACHE_VERSION = 1  # bump when the converted layout changes


# ----------------------------------------------------------------------------- frames on disk


@dataclass(frozen=True)
class NpyFile:
    """Where a .npy file's array starts, from its header."""

    path: Path
    offset: int  # bytes before the data
    dtype: np.dtype
    fortran: bool

    def __fspath__(self) -> str:
        return str(self.path)


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


def npy_header(f: Path) -> tuple[tuple[int, ...], NpyFile]:
    """(shape, where the data is) of a .npy file from its header; a DataError for anything np.load would choke
    on later: not a .npy file, pickled objects, a non-numeric dtype, fewer bytes than the header says."""
    try:
        with open(f, "rb") as fh:
            if fh.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise DataError(f"{f}: not a valid .npy file (no NumPy header; a text or other file saved under "
                                f"a .npy name?)")
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
    except DataError:
        raise
    except Exception as e:  # a damaged header
        raise DataError(f"{f}: not a valid .npy file ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise DataError(f"{f}: holds Python objects (pickled data); only numeric arrays are read")
    if dtype.kind not in "fiu":
        raise DataError(f"{f}: dtype {dtype} is not numeric")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = f.stat().st_size
    if size < need:
        raise DataError(f"{f}: truncated ({size} bytes, its header {tuple(shape)} {dtype} needs {need})")
    return tuple(int(x) for x in shape), NpyFile(Path(f), offset, dtype, bool(fortran))


def _width(key: str, natoms: int) -> int:
    return {"coord": 3 * natoms, "force": 3 * natoms, "box": 9, "virial": 9, "energy": 1}[key]


def _index_npy(path: Path, natoms: int) -> dict[str, tuple[list, list[int]] | None]:
    """key -> (files, frames per file) over the set.* folders, from the headers only."""
    sets = sorted(s for s in path.glob("set.*") if s.is_dir())
    if not sets:
        raise DataError(f"{path}: empty system (no set.* folders)")
    out: dict = {}
    for key in KEYS:
        files = [s / f"{key}.npy" for s in sets]
        present = [f.is_file() for f in files]
        if not any(present):
            out[key] = None
            continue
        if not all(present):
            missing = [s.name for s, ok in zip(sets, present) if not ok]
            raise DataError(f"{path}: {key}.npy missing in {', '.join(missing)} but present in other sets")
        counts, parts = [], []
        width = _width(key, natoms)
        for f in files:
            shape, part = npy_header(f)
            parts.append(part)
            if len(shape) == 0:
                raise DataError(f"{f}: a scalar, expected one row per frame")
            n = shape[0]
            per = int(np.prod(shape[1:], dtype=np.int64))
            if per != width and not (n == 0 and per == 0):
                what = f" ({natoms} atoms in type.raw x 3)" if key in ("coord", "force") else ""
                raise DataError(f"{f}: {key} has {per} values per frame, expected {width}{what}")
            counts.append(n)
        out[key] = (parts, counts)
    nc = out["coord"][1] if out["coord"] else None
    if nc is not None and sum(nc) == 0:
        raise DataError(f"{path}: empty system (0 frames)")
    for key in KEYS[1:]:
        if out[key] is None or nc is None:
            continue
        for f, n, m in zip(out[key][0], out[key][1], nc):
            if n != m:
                raise DataError(f"{f.path}: {key} has {n} frames, coord has {m}")
    return out


def _read_types(path: Path) -> tuple[list[str], np.ndarray, bool]:
    """(type_map.raw names, type.raw indices, nopbc) of a deepmd system folder, checked."""
    tfile = path / "type.raw"
    try:
        types = np.loadtxt(tfile, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise DataError(f"{tfile}: cannot parse: {e}") from None
    mfile = path / "type_map.raw"
    names = mfile.read_text().split() if mfile.is_file() else None
    if names is None:
        raise DataError(f"{path}: type_map.raw missing (element names are needed to map onto the model type map)")
    for i, n in enumerate(names):
        if n in names[:i]:
            raise DataError(f"{mfile}: element {n} listed twice (entries {names.index(n)} and {i}); "
                            f"each type index needs its own element")
    if len(types) == 0:
        raise DataError(f"{path}: empty system (type.raw lists no atoms)")
    bad = np.nonzero((types < 0) | (types >= len(names)))[0]
    if len(bad):
        raise DataError(f"{tfile}: type index {int(types[bad[0]])} (atom {int(bad[0])}) outside type_map.raw {names} "
                        f"(valid: 0..{len(names) - 1})")
    return names, types, (path / "nopbc").exists()


def _read_raw_text(path: Path) -> dict:
    out = {}
    for k in KEYS:
        f = path / f"{k}.raw"
        if not f.is_file():
            out[k] = None
            continue
        try:
            out[k] = np.loadtxt(f, ndmin=2, dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{f}: cannot parse: {e}") from None
    return out


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
            "coord": np.asarray(d["coords"], dtype=np.float64).reshape(nf, -1),
            "box": None if d.get("nopbc", False) else np.asarray(d["cells"], dtype=np.float64).reshape(nf, -1),
            "energy": np.asarray(d["energies"], dtype=np.float64).reshape(nf, -1) if "energies" in d else None,
            "force": np.asarray(d["forces"], dtype=np.float64).reshape(nf, -1) if "forces" in d else None,
            "virial": np.asarray(d["virials"], dtype=np.float64).reshape(nf, -1) if "virials" in d else None,
        }
        name = str(path) if len(systems) == 1 else f"{path}[{k}:{s.formula}]"
        out.append((name, list(d["atom_names"]), np.asarray(d["atom_types"]), raw, bool(d.get("nopbc", False))))
    return out


def cache_dir() -> Path:
    """Where converted datasets live: $LAMFLOW_CACHE/data, else ~/.cache/lamflow/data."""
    root = os.environ.get("LAMFLOW_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lamflow") / "data"


def content_hash(path: Path, *extra: str) -> str:
    """sha256 of a file's bytes, or of every file below a folder (relative names and bytes)."""
    h = hashlib.sha256("\0".join((str(CACHE_VERSION),) + extra).encode())
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def _write_npy_system(dst: Path, names: list[str], types: np.ndarray, raw: dict, nopbc: bool) -> None:
    (dst / "set.000").mkdir(parents=True)
    (dst / "type.raw").write_text("\n".join(str(int(t)) for t in types) + "\n")
    (dst / "type_map.raw").write_text("\n".join(names) + "\n")
    if nopbc:
        (dst / "nopbc").write_text("")
    for k, a in raw.items():
        if a is not None:
            np.save(dst / "set.000" / f"{k}.npy", np.asarray(a))


def converted(path: Path, fmt: str, labeled: bool) -> list[tuple[str, Path]]:
    """(system name, deepmd/npy folder) for a non-native dataset, converted once into the cache
    (keyed by content, format and labels) and reused by every later call."""
    key = content_hash(path, fmt, str(labeled))
    root = cache_dir() / key
    manifest = root / "systems.json"
    if not manifest.is_file():
        if fmt == "deepmd/raw":
            names, types, nopbc = _read_types(path)
            items = [(str(path), names, types, _read_raw_text(path), nopbc)]
        else:
            items = _read_dpdata(path, fmt, labeled)
        tmp = root.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, (name, names, types, raw, nopbc) in enumerate(items):
            _write_npy_system(tmp / str(k), names, types, raw, nopbc)
        (tmp / "systems.json").write_text(json.dumps({"source": str(path), "fmt": fmt, "systems": [it[0] for it in items]}))
        try:
            os.replace(tmp, root)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    names = json.loads(manifest.read_text())["systems"]
    return [(n, root / str(k)) for k, n in enumerate(names)]


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


def _native(fmt: str) -> str | None:
    if fmt in ("deepmd/npy", "deepmd", "npy"):
        return "deepmd/npy"
    return "deepmd/raw" if fmt == "deepmd/raw" else None


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
