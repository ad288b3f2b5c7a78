#!/usr/bin/env python
"""Training on one CUDA GPU, lamflow vs deepmd-kit 3.2.0 (PyTorch backend), same data, same model,
loss and learning-rate config, same steps, in one run:

    dpa2-paper   DPA-2 of templates/dpa2-paper.yaml (6 repformer layers, g1 128, g2 32, three-body
                 repinit; float64), type map O, H, on water_h2o (192 atoms, batch 1)
    dpa1         se_atten (DPA-1: sel 120, neuron [25,50,100], axis 16, attn 128 x 2 layers, tebd 8,
                 concat; float64) on water_h2o (batch 1)

For each side it prints steps/s (optimisation steps, the first 10 excluded, as deepmd-kit's
"average training time"), peak GPU memory (torch.cuda.max_memory_allocated of the training
process, both sides measured the same way, in-process) and atoms per second (steps/s x batch
frames x atoms), with the ratios lamflow / deepmd-kit side by side; repeats alternate the order
of the two sides. Then bench/nlist_speed.py runs on the same GPU (neighbour lists per batch:
numpy/cKDTree vs torch CPU vs torch CUDA, and the CUDA path's host syncs).

    python bench/gpu_train.py [--cases dpa2-paper dpa1] [--steps 300] [--repeat 2]
                              [--dp-python PATH] [--no-deepmd] [--workdir DIR] [--dry-run]

Needs a CUDA build of torch on both sides: lamflow's venv and a deepmd-kit 3.2.0 venv whose torch
sees the GPU (--dp-python, or $DEEPMD_PYTHON, or ~/.cache/lamflow/deepmd-venv; see
bench/deepmd_ref/README.md; DP_VARIANT=cuda when building it). Without CUDA it refuses, except
with --dry-run, which writes and validates the two configs of every case (lamflow's by its own
config parser) and prints what it would run. Not run by CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
TYPE_MAP = ["O", "H"]
NATOMS = 192  # water_h2o frames
BATCH = 1
DPA1 = {"type": "se_atten", "sel": 120, "rcut_smth": 0.5, "rcut": 6.0, "neuron": [25, 50, 100], "resnet_dt": False,
        "axis_neuron": 16, "attn": 128, "attn_layer": 2, "attn_dotr": True, "attn_mask": False, "tebd_dim": 8,
        "tebd_input_mode": "concat", "type_one_side": False, "smooth_type_embedding": True, "precision": "float64",
        "seed": 1}
PEAK = "GPU_PEAK_JSON "  # the line a training subprocess prints last
RE_AVG = re.compile(r"average training time:\s*([0-9.eE+-]+)\s*s/batch")


def paper_dpa2() -> dict:
    """The descriptor of templates/dpa2-paper.yaml (deepmd-kit's keys), with an explicit seed."""
    model = yaml.safe_load((REPO / "templates" / "dpa2-paper.yaml").read_text())["model"]
    return {**model["descriptor"], "seed": 1}


def config(descriptor: dict, steps: int) -> dict:
    """One input that both lamflow and deepmd-kit read (deepmd-kit's input.json keys)."""
    return {
        "model": {"type_map": TYPE_MAP, "descriptor": descriptor,
                  "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "precision": "float64", "seed": 1},
                  "data_stat_nbatch": 20},
        "learning_rate": {"type": "exp", "decay_steps": max(1, steps // 10), "start_lr": 1e-3, "stop_lr": 1e-5},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"training_data": {"systems": [str(DATA / "water_h2o/train" / f"data_{i}") for i in range(3)],
                                       "batch_size": BATCH},
                     "validation_data": {"systems": [str(DATA / "water_h2o/valid")], "batch_size": 1, "numb_btch": 1},
                     "numb_steps": steps, "seed": 10, "disp_freq": max(1, steps // 2), "save_freq": steps},
    }


CASES = {"dpa2-paper": paper_dpa2, "dpa1": lambda: dict(DPA1)}


def ours_config(cfg: dict) -> dict:
    d = copy.deepcopy(cfg)
    d["training"]["device"] = "cuda"
    return d


def deepmd_config(cfg: dict) -> dict:
    d = copy.deepcopy(cfg)
    d["training"]["disp_file"] = "lcurve.out"
    return d


def validate_ours(cfg: dict, path: Path) -> None:
    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig

    parse_config(TrainConfig, cfg, str(path))


# ----------------------------------------------------------------------------- training subprocesses


def _ours(cfg_path: str, out: str) -> None:
    """Subprocess body (lamflow's python): train, then print the peak GPU memory."""
    import torch

    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig, read_yaml
    from lamflow.model.training.trainer import train

    torch.cuda.reset_peak_memory_stats()
    res = train(parse_config(TrainConfig, read_yaml(Path(cfg_path)), cfg_path), out)
    print(PEAK + json.dumps({"s_per_step": res.metrics["s_per_step"], "n_params": res.metrics.get("n_params"),
                             "peak_alloc": torch.cuda.max_memory_allocated(),
                             "peak_reserved": torch.cuda.max_memory_reserved(),
                             "device": torch.cuda.get_device_name()}), flush=True)


DP_BODY = """
import json, sys, torch
from deepmd.main import main
torch.cuda.reset_peak_memory_stats()
main(["--pt", "train", "input.json", "--skip-neighbor-stat"])
print(%r + json.dumps({"peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
                       "device": torch.cuda.get_device_name()}), flush=True)
""" % PEAK


def last_json(text: str) -> dict | None:
    lines = [ln for ln in text.splitlines() if ln.startswith(PEAK)]
    return json.loads(lines[-1][len(PEAK):]) if lines else None


def run_ours(cfg: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.json"
    path.write_text(json.dumps(ours_config(cfg), indent=1))
    out = subprocess.run([sys.executable, __file__, "--_ours", str(path), str(work / "out")], capture_output=True, text=True)
    res = last_json(out.stdout)
    if out.returncode != 0 or res is None:
        return {"error": (out.stderr or out.stdout)[-3000:]}
    return res


def run_deepmd(dpy: str, cfg: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(deepmd_config(cfg), indent=1))
    env = dict(os.environ, NUM_WORKERS="0")
    out = subprocess.run([dpy, "-c", DP_BODY], cwd=work, capture_output=True, text=True, env=env)
    res = last_json(out.stdout)
    m = RE_AVG.findall(out.stdout + out.stderr)
    if out.returncode != 0 or res is None or not m:
        return {"error": (out.stderr or out.stdout)[-3000:]}
    res["s_per_step"] = float(m[-1])
    return res


# ----------------------------------------------------------------------------- driver


def find_dp_python(given: str | None) -> str | None:
    for c in (given, os.environ.get("DEEPMD_PYTHON"), str(Path.home() / ".cache/lamflow/deepmd-venv/bin/python")):
        if c and Path(c).is_file():
            return c
    return None


def dp_has_cuda(dpy: str) -> tuple[bool, str]:
    out = subprocess.run([dpy, "-c", "import torch, deepmd; print(torch.cuda.is_available(), deepmd.__version__)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return False, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed"
    ok, ver = out.stdout.split()
    return ok == "True", f"deepmd-kit {ver}"


def row(case: str, r: int, ours: dict, dp: dict | None) -> str:
    def fmt(res):
        if res is None:
            return "-"
        if "error" in res:
            return "ERROR"
        sps = 1.0 / res["s_per_step"]
        return f"{sps:.2f} steps/s, {res['peak_alloc'] / 2**30:.2f} GiB, {sps * BATCH * NATOMS:.0f} atoms/s"

    line = f"| {case} #{r} | {fmt(ours)} | {fmt(dp)} |"
    if dp and "error" not in dp and "error" not in ours:
        line += f" {dp['s_per_step'] / ours['s_per_step']:.2f}x | {ours['peak_alloc'] / dp['peak_alloc']:.2f} |"
    else:
        line += " - | - |"
    return line


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_ours":
        return _ours(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dp-python", default=None)
    ap.add_argument("--no-deepmd", action="store_true", help="lamflow only")
    ap.add_argument("--no-nlist", action="store_true", help="skip bench/nlist_speed.py")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="write and check the configs; needs no GPU")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lamflow-gpu-"))
    if not (DATA / "water_h2o").is_dir():
        sys.exit(f"gpu_train: data not found: {DATA / 'water_h2o'} (set LAMFLOW_SHARED_DATA)")
    if args.dry_run:
        for case in args.cases:
            cfg = config(CASES[case](), args.steps)
            d = work / case
            d.mkdir(parents=True, exist_ok=True)
            (d / "train.json").write_text(json.dumps(ours_config(cfg), indent=1))
            (d / "input.json").write_text(json.dumps(deepmd_config(cfg), indent=1))
            validate_ours(ours_config(cfg), d / "train.json")
            desc = cfg["model"]["descriptor"]
            print(f"{case}: {desc['type']}, lamflow config valid -> {d / 'train.json'}; deepmd-kit input -> {d / 'input.json'}")
            dpy = None if args.no_deepmd else find_dp_python(args.dp_python)
            if dpy:  # deepmd-kit's own argument check of its input (no training, no GPU)
                chk = subprocess.run([dpy, "-c", "import json, sys; from deepmd.utils.argcheck import normalize; "
                                      "normalize(json.load(open(sys.argv[1]))); print('ok')", str(d / "input.json")],
                                     capture_output=True, text=True)
                print(f"  deepmd-kit argcheck ({dpy}): " + ("ok" if chk.returncode == 0 else chk.stderr.strip()[-1000:]))
        print(f"dry run: would train {args.steps} steps x {args.repeat} repeats per side on cuda; workdir {work}")
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_train: needs a CUDA GPU (torch.cuda.is_available() is False here); --dry-run checks the configs only")
    dpy = None
    if not args.no_deepmd:
        dpy = find_dp_python(args.dp_python)
        if dpy is None:
            sys.exit("gpu_train: deepmd-kit venv not found: pass --dp-python (a CUDA build), or --no-deepmd")
        ok, what = dp_has_cuda(dpy)
        if not ok:
            sys.exit(f"gpu_train: {dpy} ({what}) does not see a CUDA GPU: build deepmd-kit against a CUDA torch, or --no-deepmd")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; deepmd-kit python {dpy}; {args.steps} steps, "
          f"water_h2o {NATOMS} atoms x {BATCH} frame(s) per batch; workdir {work}", flush=True)
    print("| case | lamflow | deepmd-kit | lamflow speed-up | peak memory lamflow / deepmd |\n|---|---|---|---|---|", flush=True)
    results = []
    for case in args.cases:
        cfg = config(CASES[case](), args.steps)
        for r in range(args.repeat):
            res = {"ours": None, "deepmd": None}
            order = ("ours", "deepmd") if r % 2 == 0 else ("deepmd", "ours")
            for side in order:
                if side == "ours":
                    res["ours"] = run_ours(cfg, work / case / f"ours-{r}")
                elif dpy:
                    res["deepmd"] = run_deepmd(dpy, cfg, work / case / f"deepmd-{r}")
            results.append({"case": case, "repeat": r, **res})
            print(row(case, r, res["ours"], res["deepmd"]), flush=True)
            for side, v in res.items():
                if v and "error" in v:
                    print(f"  {side} failed:\n{v['error']}", flush=True)
    (work / "gpu_train.json").write_text(json.dumps(results, indent=1))
    if not args.no_nlist:
        subprocess.run([sys.executable, str(REPO / "bench" / "nlist_speed.py"), "--rounds", "5", "--batch", "1", "8"])


if __name__ == "__main__":
    main()
