"""Label-free structures (CIF, POSCAR, extxyz without energies, any dpdata format) -> deepmd/npy.

Denoise heads train on structures alone. This module picks the reader of each file (below) and
has data/formats.py convert it once, without labels, into deepmd/npy folders in the content-keyed
cache (`formats.converted(path, fmt, labeled=False)`: `cache_dir()/<hash>/<k>`, one folder per
composition in the file), which every later run and stage reuses; deepmd/npy and deepmd/raw
folders pass through untouched.

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
from pathlib import Path

from lamflow.model.data.formats import cache_dir, converted
from lamflow.model.errors import DataError

NATIVE = ("deepmd/npy", "deepmd", "npy", "deepmd/raw")
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
    folders = [folder for _, folder in converted(path, f, labeled=False)]  # once, cached by content
    if not folders:
        raise DataError(f"{path}: no structure in it (read as {f})")
    return folders


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
    if m.is_file() and Path(folder).parent.parent == cache_dir():
        return json.loads(m.read_text()).get("source", str(folder))
    return str(folder)
