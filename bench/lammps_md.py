"""LAMMPS (`pair_style deepmd`) on exported lamflow models, checked against lamflow itself.

    python bench/lammps_md.py

Builds (once) the LAMMPS + deepmd-kit venv of bench/lammps/setup_venv.sh, then runs the
lammps-marked tests of tests/model/test_lammps.py, which CI deselects (the venv is ~5 GB: deepmd-kit's
LAMMPS plugin is built for torch 2.11 and CUDA 12 runtime libraries), and prints what they
measured: first-step energy/force differences, how far 200 NVE steps in LAMMPS drift from
lamflow's ASE velocity Verlet from the same start, and 2 MPI ranks vs 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    t0 = time.time()
    venv = subprocess.run(["bash", str(REPO / "bench" / "lammps" / "setup_venv.sh")], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    print(f"LAMMPS venv {venv} ready in {time.time() - t0:.0f} s")
    figures = Path(tempfile.mkdtemp(prefix="lamflow-lammps-")) / "figures.json"
    env = {**os.environ, "LAMFLOW_LAMMPS_VENV": venv, "LAMFLOW_LAMMPS_FIGURES": str(figures), "OMP_NUM_THREADS": "1"}
    t1 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "lammps", str(REPO / "tests" / "model" / "test_lammps.py")],
                       cwd=REPO, env=env)
    print(f"lammps tests: exit {r.returncode} in {time.time() - t1:.0f} s")
    if figures.is_file():
        for key, value in json.loads(figures.read_text()).items():
            shown = max(value) if isinstance(value, list) else value
            print(f"  {key}: {shown:.3e}" + (" (max over the checkpoints)" if isinstance(value, list) else ""))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
