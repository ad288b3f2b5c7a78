#!/usr/bin/env python
"""Side-by-side training benchmark: lamflow vs deepmd-kit 3.2.0 (PyTorch backend), same data,
same model/loss/lr config, same steps, same threads, in one run.

    python bench/train_vs_deepmd.py [--cases water_se_e2_a ch4_se_e2_a ch4_se_atten ch4_dpa2 ch4_dpa3] [--threads 2]
                                    [--steps N] [--repeat R] [--dp-python PATH]

For each case it writes one deepmd-kit input.json and makes ONE random initialisation with
deepmd-kit (a 1-step run); both sides then start from those same weights (deepmd-kit with
`--init-model`, lamflow from the imported checkpoint, `lamflow import-deepmd`), so that the
RMSEs compare training, not the luck of the initial energy offset (which dominates short runs:
seen here, 0.2 vs 1.6 eV/atom for two seeds of the same model). deepmd-kit trains with
`dp --pt train` (through bench/deepmd_ref/run_deepmd.py in the deepmd-kit venv; see
bench/deepmd_ref/README.md), lamflow in a fresh process; both are tested on the valid split.
It prints s/step of both (optimisation steps only, first 10 excluded, as deepmd-kit reports
"average training time"), the speed ratio, and energy/force RMSE of both. Not run in CI.
The machine's noise matters: run it on a quiet machine, read the ratios, and repeat.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def water(descriptor: dict, steps: int) -> dict:
    return {
        "model": {"type_map": ["O", "H"], "descriptor": descriptor,
                  "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "precision": "float64", "seed": 1},
                  "data_stat_nbatch": 20},
        "learning_rate": {"type": "exp", "decay_steps": max(1, steps // 10), "start_lr": 1e-3, "stop_lr": 1e-5},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"training_data": {"systems": [str(DATA / "water_h2o/train" / f"data_{i}") for i in range(3)],
                                       "batch_size": 1},
                     "validation_data": {"systems": [str(DATA / "water_h2o/valid")], "batch_size": 1, "numb_btch": 1},
                     "numb_steps": steps, "seed": 10, "disp_freq": max(1, steps // 5), "save_freq": steps},
    }


def ch4(descriptor: dict, steps: int) -> dict:
    cfg = water(descriptor, steps)
    cfg["model"]["type_map"] = ["H", "C"]
    cfg["model"]["fitting_net"]["neuron"] = [32, 32, 32]
    cfg["learning_rate"].update(start_lr=1e-3, stop_lr=1e-5)
    cfg["training"]["training_data"] = {"systems": [str(DATA / "ch4_pbe/train")], "batch_size": 1}
    cfg["training"]["validation_data"] = {"systems": [str(DATA / "ch4_pbe/valid")], "batch_size": 1, "numb_btch": 1}
    return cfg


SE_E2A_WATER = {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.5, "rcut": 6.0, "neuron": [25, 50, 100],
                "resnet_dt": False, "axis_neuron": 16, "type_one_side": True, "precision": "float64", "seed": 1}
SE_E2A_CH4 = {"type": "se_e2_a", "sel": [4, 1], "rcut_smth": 0.5, "rcut": 6.0, "neuron": [10, 20, 40],
              "resnet_dt": False, "axis_neuron": 4, "type_one_side": False, "precision": "float64", "seed": 1}
SE_ATTEN_CH4 = {"type": "se_atten", "sel": 8, "rcut_smth": 0.5, "rcut": 6.0, "neuron": [10, 20, 40], "resnet_dt": False,
                "axis_neuron": 4, "attn": 32, "attn_layer": 1, "attn_dotr": True, "attn_mask": False, "tebd_dim": 8,
                "tebd_input_mode": "concat", "type_one_side": False, "smooth_type_embedding": True,
                "precision": "float64", "seed": 1}
# the small DPA-2 of templates/dpa2-small.yaml with explicit sel (deepmd-kit needs them and repinit nsel > repformer
# nsel); CH4 has <= 4 neighbours
DPA2_CH4 = {"type": "dpa2", "precision": "float64", "smooth": True, "concat_output_tebd": True,
            "add_tebd_to_repinit_out": False, "seed": 1,
            "repinit": {"rcut": 6.0, "rcut_smth": 0.5, "nsel": 12, "neuron": [6, 12, 24], "axis_neuron": 4, "tebd_dim": 8,
                        "tebd_input_mode": "concat", "activation_function": "tanh", "use_three_body": True,
                        "three_body_neuron": [2, 4, 8], "three_body_rcut": 4.0, "three_body_rcut_smth": 3.5,
                        "three_body_sel": 8},
            "repformer": {"rcut": 4.0, "rcut_smth": 3.5, "nsel": 8, "nlayers": 2, "g1_dim": 16, "g2_dim": 8,
                          "axis_neuron": 4, "attn1_hidden": 8, "attn1_nhead": 2, "attn2_hidden": 8, "attn2_nhead": 2,
                          "attn2_has_gate": True, "update_g1_has_attn": False, "update_g2_has_g1g1": False,
                          "update_g2_has_attn": True, "update_h2": False, "update_style": "res_residual",
                          "update_residual": 0.01, "update_residual_init": "norm"}}
SE_ATTEN_WATER = dict(SE_ATTEN_CH4, sel=120, neuron=[25, 50, 100], axis_neuron=16, attn=128, attn_layer=2)
# the small DPA-3 of templates/dpa3-small.yaml with explicit sel (deepmd-kit needs them)
DPA3_CH4 = {"type": "dpa3", "precision": "float64", "concat_output_tebd": False, "activation_function": "silu", "seed": 1,
            "repflow": {"n_dim": 16, "e_dim": 8, "a_dim": 4, "nlayers": 2, "e_rcut": 6.0, "e_rcut_smth": 0.5, "e_sel": 12,
                        "a_rcut": 4.0, "a_rcut_smth": 3.5, "a_sel": 8, "axis_neuron": 4, "update_angle": True,
                        "update_style": "res_residual", "update_residual": 0.1, "update_residual_init": "const",
                        "smooth_edge_update": True, "fix_stat_std": 0.3}}

CASES = {
    "water_se_e2_a": lambda n: water(SE_E2A_WATER, n or 200),
    "ch4_se_e2_a": lambda n: ch4(SE_E2A_CH4, n or 300),
    "ch4_se_atten": lambda n: ch4(SE_ATTEN_CH4, n or 300),
    "ch4_dpa2": lambda n: ch4(DPA2_CH4, n or 200),
    "ch4_dpa3": lambda n: ch4(DPA3_CH4, n or 200),
    "water_se_atten": lambda n: water(SE_ATTEN_WATER, n or 40),
}

DEEPMD_ONLY_TRAINING_KEYS = ("disp_file",)


def find_dp_python(given: str | None) -> str:
    cands = [given, os.environ.get("DEEPMD_PYTHON"), str(Path.home() / ".cache/lamflow/deepmd-venv/bin/python"),
             "/tmp/dpref/venv-src/bin/python", "/tmp/dpref/venv-wheel/bin/python"]
    for c in cands:
        if c and Path(c).is_file():
            return c
    sys.exit("deepmd-kit venv not found: run `bash bench/deepmd_ref/setup_venv.sh` or pass --dp-python")


def dp_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), DP_INTRA_OP_PARALLELISM_THREADS=str(threads),
                DP_INTER_OP_PARALLELISM_THREADS="1", NUM_WORKERS="0")


def make_init(dpy: str, cfg: dict, work: Path, threads: int) -> Path:
    """One deepmd-kit step from a random start: the shared initial weights (+ data statistics)."""
    work.mkdir(parents=True, exist_ok=True)
    d = copy.deepcopy(cfg)
    d["training"].update(numb_steps=1, save_freq=1, disp_freq=1, disp_file="lcurve.out")
    (work / "input.json").write_text(json.dumps(d, indent=1))
    dp = str(Path(dpy).parent / "dp")
    out = subprocess.run([dp, "--pt", "train", "input.json", "--skip-neighbor-stat"], cwd=work, capture_output=True,
                         text=True, env=dp_env(threads))
    ckpt = work / "model.ckpt-1.pt"
    if out.returncode != 0 or not ckpt.is_file():
        sys.exit(f"deepmd-kit init run failed:\n{out.stderr[-2000:]}")
    ours = work / "init.ckpt"
    subprocess.run([sys.executable, "-m", "lamflow.workflows.cli", "import-deepmd", str(ckpt), "-o", str(ours)], check=True)
    return ckpt


def run_deepmd(dpy: str, cfg: dict, work: Path, threads: int, init: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "input.json"
    d = copy.deepcopy(cfg)
    d["training"]["disp_file"] = "lcurve.out"
    inp.write_text(json.dumps(d, indent=1))
    cmd = [dpy, str(REPO / "bench/deepmd_ref/run_deepmd.py"), "--input", str(inp), "--workdir", str(work / "dp"),
           "--test-systems", *d["training"]["validation_data"]["systems"], "--threads", str(threads),
           "--init-model", str(init)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not line:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(line[-1])


def run_ours(cfg: dict, work: Path, threads: int, init: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    d = copy.deepcopy(cfg)
    for k in DEEPMD_ONLY_TRAINING_KEYS:
        d["training"].pop(k, None)
    d["training"]["num_threads"] = threads
    inp = work / "train.json"
    inp.write_text(json.dumps(d, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--_ours", str(inp), str(init.parent / "init.ckpt"), str(work / "out")],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    m = json.loads((work / "out" / "train.json").read_text())
    m["process_wall_s"] = time.time() - t0
    return m


def _ours_from_init(cfg_path: str, init: str, out: str) -> None:
    """Subprocess body: lamflow training from the imported initial weights."""
    from lamflow.model.io.checkpoint import read_checkpoint
    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig, read_yaml
    from lamflow.model.training.trainer import train

    cfg = parse_config(TrainConfig, read_yaml(Path(cfg_path)), cfg_path)
    state = read_checkpoint(init)["state_dict"]
    train(cfg, out, init=lambda model, systems: model.load_state_dict(state))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_ours":
        return _ours_from_init(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["water_se_e2_a", "ch4_se_e2_a", "ch4_se_atten"], choices=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dp-python", default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = ap.parse_args()
    dpy = find_dp_python(args.dp_python)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lamflow-bench-"))
    print(f"# deepmd-kit python: {dpy}\n# threads {args.threads}, workdir {work}", flush=True)
    results = []
    for case in args.cases:
        cfg = CASES[case](args.steps)
        init = make_init(dpy, cfg, work / case / "init", args.threads)
        for r in range(args.repeat):
            # alternate the order between repeats so that drifting machine load hits both sides
            order = ("ours", "deepmd") if r % 2 == 0 else ("deepmd", "ours")
            res = {}
            for side in order:
                w = work / case / f"{side}-{r}"
                run = run_ours if side == "ours" else functools.partial(run_deepmd, dpy)
                res[side] = run(cfg, w, args.threads, init)
            results.append({"case": case, "repeat": r, **res})
            print_row(case, r, res["ours"], res["deepmd"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_row(case: str, r: int, ours: dict, dp: dict) -> None:
    if "error" in ours or "error" in dp:
        print(f"{case} #{r}: ERROR ours={ours.get('error', 'ok')[:300]!r} deepmd={dp.get('error', 'ok')[:300]!r}")
        return
    so, sd = ours["s_per_step"], dp["s_per_step"]
    print(f"{case} #{r}: s/step ours {so:.4f} deepmd {sd:.4f} -> ours {sd / so:.2f}x faster | "
          f"valid RMSE E/atom ours {ours['rmse_e_per_atom'] * 1e3:.2f} deepmd {dp['rmse_e_per_atom'] * 1e3:.2f} meV, "
          f"F ours {ours['rmse_f'] * 1e3:.1f} deepmd {dp['rmse_f'] * 1e3:.1f} meV/A | "
          f"params ours {ours.get('n_params')} deepmd {dp.get('n_params')}", flush=True)


if __name__ == "__main__":
    main()
