"""The reference deepmd-kit 3.2.0 for parity tests: find (or install) its separate virtualenv,
train tiny models with `dp --pt train`, and evaluate them with `deepmd.infer.DeepPot`.

deepmd-kit lives in its own venv (it pins other versions than ours); everything here talks to
it through subprocesses, passing numpy files both ways.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DP_VERSION = "3.2.0"
WHEEL_VENV = Path.home() / ".cache" / "lamflow" / "deepmd-wheel-venv"
CANDIDATES = [
    Path.home() / ".cache" / "lamflow" / "deepmd-venv" / "bin" / "python",
    Path("/tmp/dpref/venv-src/bin/python"),
    Path("/tmp/dpref/venv-wheel/bin/python"),
    WHEEL_VENV / "bin" / "python",
]
QUIET_ENV = {"OMP_NUM_THREADS": "1", "DP_INTRA_OP_PARALLELISM_THREADS": "1", "DP_INTER_OP_PARALLELISM_THREADS": "1",
             "NUM_WORKERS": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


class DeepmdUnavailable(RuntimeError):
    """deepmd-kit is neither installed nor installable here; the message says why."""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, **QUIET_ENV}


def _works(python: Path) -> bool:
    if not (python.is_file() and (python.parent / "dp").is_file()):
        return False
    check = f"import deepmd; assert deepmd.__version__.startswith('{DP_VERSION}'), deepmd.__version__"
    return subprocess.run([str(python), "-c", check], env=_env(), capture_output=True, timeout=120).returncode == 0


def find_deepmd_python() -> Path | None:
    """$LAMFLOW_DEEPMD_PYTHON, else the first working venv among the known places."""
    explicit = os.environ.get("LAMFLOW_DEEPMD_PYTHON")
    for p in ([Path(explicit)] if explicit else []) + CANDIDATES:
        if _works(p):
            return p
    return None


def _install_wheel_venv(venv: Path) -> None:
    """deepmd-kit's PyPI wheel in a fresh venv. Its compiled ops are built for another torch and
    do not load with torch 2.13, so they are moved aside: training and DeepPot inference then use
    deepmd-kit's pure-PyTorch code (only `dp compress` needs the ops)."""
    script = REPO / "bench" / "deepmd_ref" / "setup_venv.sh"
    if script.is_file():
        env = {**_env(), "DEEPMD_MODE": "wheel", "DEEPMD_VENV": str(venv), "PYTHON": sys.executable}
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise DeepmdUnavailable(f"setup_venv.sh failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        return
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [[sys.executable, "-m", "venv", str(venv)], pip + ["torch==2.13.0"],
             pip + [f"deepmd-kit=={DP_VERSION}", "mpich", "e3nn", "torch==2.13.0"]]
    for cmd in steps:
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise DeepmdUnavailable(f"`{' '.join(cmd[-3:])}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    for so in venv.glob("lib/python*/site-packages/deepmd/lib/libdeepmd_op_pt.so"):
        so.rename(so.with_name(so.name + ".disabled-torch-mismatch"))


def ensure_deepmd_venv() -> Path:
    """The python of a working deepmd-kit venv; installs the wheel-based one if none exists.
    Raises DeepmdUnavailable (with the reason) only when that install fails."""
    found = find_deepmd_python()
    if found is not None:
        return found
    try:
        _install_wheel_venv(WHEEL_VENV)
    except (OSError, subprocess.SubprocessError) as e:
        raise DeepmdUnavailable(f"installing deepmd-kit {DP_VERSION} into {WHEEL_VENV} failed: {e}") from None
    python = WHEEL_VENV / "bin" / "python"
    if not _works(python):
        raise DeepmdUnavailable(f"deepmd-kit {DP_VERSION} installed into {WHEEL_VENV} but does not import")
    return python


def train_input(type_map, descriptor, systems, fitting=None, steps=5, **model_extra) -> dict:
    """A tiny deepmd-kit input.json (few steps, small nets, explicit sel, float64)."""
    return {
        "model": {"type_map": list(type_map), "descriptor": descriptor,
                  "fitting_net": fitting or {"neuron": [8, 8], "resnet_dt": True, "seed": 1}, **model_extra},
        "learning_rate": {"type": "exp", "decay_steps": 5, "start_lr": 1e-3, "stop_lr": 1e-4},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {"training_data": {"systems": [str(s) for s in systems], "batch_size": 1},
                     "numb_steps": steps, "seed": 1, "disp_freq": steps, "save_freq": steps,
                     "disp_file": "lcurve.out"},
    }


def dp_train(python: Path, config: dict, workdir: Path, cache: Path | None = None) -> Path:
    """`dp --pt train` (no neighbour statistics: sel is explicit) -> model.ckpt.pt.
    With `cache`, a model trained earlier from the identical input is reused."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    if cache is not None and (cache / key / "model.ckpt.pt").is_file():
        return cache / key / "model.ckpt.pt"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "input.json").write_text(json.dumps(config, indent=1))
    r = subprocess.run([str(python.parent / "dp"), "--pt", "train", "input.json", "--skip-neighbor-stat"],
                       cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900)
    ckpt = workdir / "model.ckpt.pt"
    if r.returncode != 0 or not ckpt.is_file():
        raise RuntimeError(f"dp train failed in {workdir}:\n{r.stderr[-3000:]}")
    ckpt = ckpt.resolve()  # model.ckpt.pt is a symlink to model.ckpt-<steps>.pt
    if cache is not None:
        (cache / key).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ckpt, cache / key / "model.ckpt.pt")
        return cache / key / "model.ckpt.pt"
    return ckpt


_EVAL = r"""
import json, sys
import numpy as np
from deepmd.infer import DeepPot
pots = {}
for job in json.load(open(sys.argv[1])):
    d = np.load(job["frames"])
    key = (job["model"], job.get("head"))
    if key not in pots:  # one per model and head; no_jit: the eager model, without seconds of scripting
        pots[key] = DeepPot(job["model"], head=job.get("head"), no_jit=True)
    dp = pots[key]
    box = d["box"] if "box" in d.files else None
    e, f, v = dp.eval(d["coord"], box, d["atype"].tolist())
    nf = len(d["coord"])
    np.savez(job["out"], energy=np.asarray(e).reshape(nf), force=np.asarray(f).reshape(nf, -1, 3),
             virial=np.asarray(v).reshape(nf, 9), type_map=np.array(dp.get_type_map()))
"""


def deeppot_eval(python: Path, jobs: list[dict], workdir: Path) -> list[dict[str, np.ndarray]]:
    """Evaluate with deepmd.infer.DeepPot in one subprocess. Each job: model (checkpoint path),
    head (branch or None), coord [nf, nat, 3], box [nf, 3, 3] or None, atype [nat] (indices into
    the model's type map). Returns energy [nf], force [nf, nat, 3], virial [nf, 9] per job."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = []
    for i, job in enumerate(jobs):
        frames = workdir / f"frames_{i}.npz"
        arrays = {"coord": np.asarray(job["coord"], np.float64), "atype": np.asarray(job["atype"], np.int64)}
        if job.get("box") is not None:
            arrays["box"] = np.asarray(job["box"], np.float64)
        np.savez(frames, **arrays)
        spec.append({"model": str(job["model"]), "head": job.get("head"), "frames": str(frames),
                     "out": str(workdir / f"ref_{i}.npz")})
    (workdir / "jobs.json").write_text(json.dumps(spec))
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=workdir, delete=False) as f:
        f.write(_EVAL)
    r = subprocess.run([str(python), f.name, str(workdir / "jobs.json")], env=_env(), capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"DeepPot evaluation failed:\n{r.stderr[-3000:]}")
    return [dict(np.load(s["out"])) for s in spec]


def load_frames(frames: dict[tuple, list[int]], type_map: list[str]) -> dict[str, tuple]:
    """{data path parts: frame indices} -> {"a/b/c": (coord, box or None, atype over type_map)}."""
    from conftest import data_path

    from lamflow.model.data.systems import load_systems

    out = {}
    for parts, idx in frames.items():
        s = load_systems([str(data_path(*parts))], type_map)[0]
        out["/".join(parts)] = (s.coord[idx], None if s.box is None else s.box[idx], s.atype)
    return out
