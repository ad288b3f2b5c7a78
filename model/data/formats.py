"""Files on disk -> arrays: deepmd/npy indexed from its .npy headers (one memory map per
`set.*` file), deepmd/raw read as text, every other format converted once through dpdata into a
deepmd/npy cache keyed by a hash of its content (`cache_dir()`: $LAMFLOW_CACHE/data or
~/.cache/lamflow/data). Problems are `DataError`s naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamflow.model.errors import DataError

KEYS = ("coord", "box", "energy", "force", "virial")


MULTI_FORMATS = {"extxyz", "quip/gap/xyz", "xyz", "ase/structure"}
# structure files ASE reads: lamflow's name -> ASE's format (None: ASE guesses from name and content);
# extxyz without labels too (dpdata's own extxyz reader wants energies)
ASE_FORMATS = {"cif": "cif", "ase": None}


NPY_MAGIC = b"\x93NUMPY"


CACHE_VERSION = 1  # bump when the converted layout changes


@dataclass(frozen=True)
class NpyFile:
    """Where a .npy file's array starts, from its header."""

    path: Path
    offset: int  # bytes before the data
    dtype: np.dtype
    fortran: bool

    def __fspath__(self) -> str:
        return str(self.path)


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
        if fmt in ASE_FORMATS or (fmt == "extxyz" and not labeled):  # read by ASE (dpdata's ase/structure)
            ase_fmt = ASE_FORMATS.get(fmt, fmt)
            kw = {"ase_fmt": ase_fmt} if ase_fmt else {}
            ms = dpdata.MultiSystems.from_file(str(path), fmt="ase/structure", labeled=labeled, **kw)
            systems = [s for s in ms.systems.values() if len(s) > 0]
        elif fmt in MULTI_FORMATS:  # one file, many frames / compositions
            systems = list(dpdata.MultiSystems.from_file(str(path), fmt=fmt, labeled=labeled).systems.values())
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
