"""Label-free structures (CIF, POSCAR, extxyz without energies, any dpdata format) -> deepmd/npy.

Denoise heads train on structures alone. lamflow.model.data reads deepmd/npy structure folders
without labels (`load_systems(..., labeled=False)`), but its dpdata path asks multi-frame readers
for labels, so a CIF or an extxyz without energies cannot be read there. This module converts
such files once, without labels, into deepmd/npy folders in the same content-keyed cache
(`data.cache_dir()/structures/<hash>/<k>`, one folder per composition in the file), which every
later run and stage reuses; deepmd/npy and deepmd/raw folders pass through untouched.

    fmt          reader (labels never read)
    cif          ASE (dpdata's ase/structure), format cif
    extxyz       ASE, format extxyz (energies, if any, are ignored)
    ase          ASE, format guessed from the file's name and content (a staged copy on Argo is
                 named 0, 1, ...: name the format where ASE cannot tell it from the content)
    vasp/poscar  dpdata (also POSCAR, CONTCAR, *.vasp under fmt auto)
    auto         by name: folder -> deepmd/npy or raw; *.cif; *.xyz / *.extxyz; POSCAR / CONTCAR / *.vasp / *.poscar
    other        dpdata.System(path, fmt) (lammps/lmp, abacus/stru, ...)

Problems are DataErrors naming the file: "a.cif: cannot read it as cif: ...".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lamflow.model.data.formats import cache_dir, content_hash
from lamflow.model.errors import DataError

NATIVE = ("deepmd/npy", "deepmd", "npy", "deepmd/raw")
ASE_FORMATS = {"cif": "cif", "extxyz": "extxyz", "ase": None, "ase/structure": None}
ALIASES = {"poscar": "vasp/poscar", "contcar": "vasp/poscar"}


def structure_format(path: Path, fmt: str = "auto") -> str:
    """The reader of one path: a native deepmd format, an ASE_FORMATS key or a dpdata format."""
    fmt = ALIASES.get(fmt.lower(), fmt)
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "deepmd/npy"  # deepmd/npy or deepmd/raw folders: lamflow.model.data reads them itself
    name = path.name.lower()
    if name.endswith(".cif"):
        return "cif"
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if name.startswith(("poscar", "contcar")) or name.endswith((".vasp", ".poscar")):
        return "vasp/poscar"
    raise DataError(f"{path}: cannot guess the structure format; give fmt (cif, extxyz, vasp/poscar or a dpdata format)")


def _read(path: Path, fmt: str) -> list:
    """dpdata Systems (unlabeled) of one file."""
    import dpdata

    try:
        if fmt in ASE_FORMATS:
            kw = {"ase_fmt": ASE_FORMATS[fmt]} if ASE_FORMATS[fmt] else {}
            return list(dpdata.MultiSystems.from_file(str(path), fmt="ase/structure", labeled=False, **kw).systems.values())
        if fmt in ("quip/gap/xyz", "xyz"):
            return list(dpdata.MultiSystems.from_file(str(path), fmt=fmt, labeled=False).systems.values())
        return [dpdata.System(str(path), fmt=fmt)]
    except Exception as e:  # a reader's own error (parse error, wrong format): name the file
        raise DataError(f"{path}: cannot read it as {fmt}: {type(e).__name__}: {e}".rstrip(": ")) from None


def _write(dst: Path, system) -> None:
    """One dpdata System as a deepmd/npy folder (coordinates and cell only)."""
    d = system.data
    nf = len(d["coords"])
    (dst / "set.000").mkdir(parents=True)
    (dst / "type.raw").write_text("\n".join(str(int(t)) for t in d["atom_types"]) + "\n")
    (dst / "type_map.raw").write_text("\n".join(d["atom_names"]) + "\n")
    np.save(dst / "set.000" / "coord.npy", np.asarray(d["coords"], dtype=np.float64).reshape(nf, -1))
    if d.get("nopbc", False):
        (dst / "nopbc").write_text("")
    else:
        np.save(dst / "set.000" / "box.npy", np.asarray(d["cells"], dtype=np.float64).reshape(nf, -1))


def converted_structures(path: str | os.PathLike, fmt: str = "auto") -> list[Path]:
    """deepmd/npy folders holding the structures of `path` (the path itself when it is native)."""

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_symlink():  # a staged link (named 0, 1, ...): the target's name tells ASE the format
        path = path.resolve()
    f = structure_format(path, fmt)
    if f in NATIVE:
        return [path]
    if path.is_dir():
        raise DataError(f"{path}: a folder; fmt {f} reads files (list them, or use a glob such as {path}/*)")
    root = cache_dir() / "structures" / content_hash(path, "structures", f)
    manifest = root / "systems.json"
    if not manifest.is_file():
        systems = [s for s in _read(path, f) if len(s) > 0]
        if not systems:
            raise DataError(f"{path}: no structure in it (read as {f})")
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for k, s in enumerate(systems):
            _write(tmp / str(k), s)
        (tmp / "systems.json").write_text(json.dumps({"source": str(path), "fmt": f, "systems": len(systems)}))
        try:
            os.replace(tmp, root)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    n = json.loads(manifest.read_text())["systems"]
    return [root / str(k) for k in range(n)]


def structure_paths(paths: list[str], fmt: str = "auto") -> tuple[list[str], str]:
    """(paths, fmt) that lamflow.model.data.systems.load_systems reads without labels: every non-native
    file converted (cached); fmt "auto" then, since the results are deepmd/npy folders."""
    out: list[str] = []
    for p in paths:
        out += [str(d) for d in converted_structures(p, fmt)]
    f = ALIASES.get(fmt.lower(), fmt)
    return out, (f if f in NATIVE else "auto")


def source_of(folder: str | os.PathLike) -> str:
    """The file a converted folder came from (the folder itself when it was not converted)."""
    m = Path(folder).parent / "systems.json"
    if m.is_file() and Path(folder).parent.parent.name == "structures":
        return json.loads(m.read_text()).get("source", str(folder))
    return str(folder)
