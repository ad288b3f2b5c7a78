"""Writing a System as deepmd/npy (only the elements present), beside and renamed into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lamflow.model.data.systems import System


def write_system(s: System, path: str | os.PathLike) -> Path:
    """deepmd/npy with only the elements present; written beside and renamed into place."""
    path = Path(path)
    used = sorted(set(s.atype.tolist()))
    lut = np.full(max(used) + 1, -1)
    lut[used] = np.arange(len(used))
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "set.000").mkdir(parents=True)
    (tmp / "type.raw").write_text("\n".join(str(t) for t in lut[s.atype]) + "\n")
    (tmp / "type_map.raw").write_text("\n".join(s.elements[t] for t in used) + "\n")
    nf = s.nframes
    np.save(tmp / "set.000" / "coord.npy", s.coord.reshape(nf, -1))
    if s.box is None:
        (tmp / "nopbc").touch()
    else:
        np.save(tmp / "set.000" / "box.npy", s.box.reshape(nf, 9))
    for key in ("energy", "force", "virial"):
        a = getattr(s, key)
        if a is not None:
            np.save(tmp / "set.000" / f"{key}.npy", a.reshape(nf, -1) if key != "energy" else a)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
