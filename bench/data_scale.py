"""Training start-up, memory and speed as the data grows: streaming data (this checkout) vs the
implementation before it (git 70bfdfd: every frame and its neighbour graph in RAM), side by side.

    python bench/data_scale.py [--scales 1 10 100 1000] [--old-scales 1 10] [--work /tmp/lamflow_data_scale]

1. Tiles the frames of ../shared/data/water_h2o/train (3 systems, 320 frames of 192 atoms) N
   times on disk: every system gets N copies of its frames as real set.* files (float32, as the
   source; 1000x = 320 k frames, 1.4 GB of coord + force).
2. Trains the same small se_e2_a model 50 steps on each size, each run in a fresh process, and
   prints peak RSS (the training process; DataLoader workers apart), the time from process start
   to the end of the first step, and steps/s over the other steps. The old implementation is
   extracted with `git archive` and run at the sizes it can hold (it keeps a graph per frame).
3. The share of a CPU training step spent outside the model's forward/backward and the
   optimizer step (data + neighbour list) for water se_e2_a and the small DPA-2 (on CH4), for
   both implementations (new: num_workers 0, all in the training process, and 1 worker, graph
   built in the worker).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T0 = time.time()  # process start (before torch is imported)
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
OLD_COMMIT = "70bfdfd"
COPIES_PER_SET = 10  # copies of a system's frames per set.* folder of a tiled system

SMALL_SE_E2A = {"type": "se_e2_a", "sel": "auto", "rcut_smth": 0.5, "rcut": 6.0, "neuron": [10, 20, 40],
                "resnet_dt": False, "axis_neuron": 4, "type_one_side": True, "precision": "float64", "seed": 1}


# ----------------------------------------------------------------------------- data


def tile(work: Path, scale: int) -> Path:
    """water_h2o/train with every system's frames repeated `scale` times, as real files."""
    import numpy as np

    out = work / f"water_x{scale}"
    if (out / "DONE").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    for src in sorted((DATA / "water_h2o" / "train").glob("data_*")):
        dst = out / src.name
        dst.mkdir(parents=True)
        for f in ("type.raw", "type_map.raw"):
            shutil.copy(src / f, dst / f)
        arrays = {k: np.concatenate([np.load(s / f"{k}.npy") for s in sorted(src.glob("set.*"))])
                  for k in ("coord", "force", "box", "energy")}
        nsets = -(-scale // COPIES_PER_SET)
        for j in range(nsets):
            copies = min(COPIES_PER_SET, scale - j * COPIES_PER_SET)
            sd = dst / f"set.{j:03d}"
            sd.mkdir()
            for k, a in arrays.items():
                np.save(sd / f"{k}.npy", np.concatenate([a] * copies))
    (out / "DONE").write_text("")
    return out


def old_checkout(work: Path) -> Path:
    """The old implementation as an importable `lamflow` package (git archive, no worktree)."""
    root = work / f"old_{OLD_COMMIT}"
    pkg = root / "pkg" / "lamflow"
    if not (pkg / "model" / "data.py").is_file():
        src = root / "src"
        shutil.rmtree(root, ignore_errors=True)
        src.mkdir(parents=True)
        tar = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "model", "ops", "workflows"],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
        pkg.mkdir(parents=True)
        for d in ("model", "ops", "workflows"):
            (pkg / d).symlink_to(src / d)
    return root / "pkg"


# ----------------------------------------------------------------------------- one run (child process)


def config(case: str, data: str | None, steps: int, workers: int | None) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from train_vs_deepmd import DPA2_CH4, SE_E2A_WATER

    if case.startswith("water"):
        desc = SMALL_SE_E2A if case == "water_small" else SE_E2A_WATER
        tm, fit = ["O", "H"], [32, 32, 32] if case == "water_small" else [240, 240, 240]
        train = [str(p) for p in sorted(Path(data).glob("data_*"))] if data else str(DATA / "water_h2o" / "train")
        valid = str(DATA / "water_h2o" / "valid")
    else:
        desc, tm, fit = DPA2_CH4, ["H", "C"], [32, 32, 32]
        train, valid = str(DATA / "ch4_pbe" / "train"), str(DATA / "ch4_pbe" / "valid")
    training = {"training_data": {"systems": train, "batch_size": 1},
                "validation_data": {"systems": valid, "batch_size": 1, "numb_btch": 1},
                "numb_steps": steps, "seed": 10, "disp_freq": steps, "save_freq": steps, "device": "cpu", "num_threads": 1}
    if workers is not None:
        training["num_workers"] = workers
    return {"model": {"type_map": tm, "descriptor": desc, "fitting_net": {"neuron": fit, "seed": 1}},
            "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
            "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": training}


def child(args) -> None:
    import torch
    import yaml

    from lamflow.model.training.config import load_train_config
    from lamflow.model.training.loss import EnergyLoss
    from lamflow.model.training.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.yaml").write_text(yaml.safe_dump(config(args.case, args.data, args.steps, args.workers)))
    cfg = load_train_config(out / "train.yaml")
    # CPU time of this process (time.process_time): the machine may be shared, wall time is printed too
    ends, ends_wall, model_t = [], [], [0.0]
    timing = [False]  # model time is counted from the end of step 2 on (step 1: start-up; after it: validation)
    adam_step, loss_call, backward = torch.optim.Adam.step, EnergyLoss.__call__, torch.Tensor.backward
    clock = time.process_time

    def timed_step(self, *a, **k):
        t = clock()
        r = adam_step(self, *a, **k)
        if timing[0]:
            model_t[0] += clock() - t
        ends.append(clock())
        ends_wall.append(time.time())
        timing[0] = len(ends) >= 2
        return r

    def timed_loss(self, model, batch, coef, training=True):
        t = clock()
        r = loss_call(self, model, batch, coef, training)
        if training and timing[0]:
            model_t[0] += clock() - t
        return r

    def timed_backward(self, *a, **k):
        t = clock()
        r = backward(self, *a, **k)
        if timing[0]:
            model_t[0] += clock() - t
        return r

    torch.optim.Adam.step, EnergyLoss.__call__, torch.Tensor.backward = timed_step, timed_loss, timed_backward
    train(cfg, out / "run", log=lambda *a: None)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(ends) - 2
    span, wall = ends[-1] - ends[1], ends_wall[-1] - ends_wall[1]
    print("RESULT " + json.dumps({
        "first_step_wall_s": ends_wall[0] - T0, "first_step_cpu_s": ends[0], "steps_per_s": n / wall,
        "cpu_ms_per_step": 1000 * span / n, "worker_cpu_ms_per_step": 1000 * (kids.ru_utime + kids.ru_stime) / len(ends),
        "peak_rss_mb": me.ru_maxrss / 1024, "worker_rss_mb": kids.ru_maxrss / 1024, "outside_share": 1 - model_t[0] / span}))


def run_child(impl: str, case: str, data: Path | None, steps: int, work: Path, old_pkg: Path | None,
              workers: int | None = None) -> dict:
    tag = f"{impl}_{case}_{data.name if data else 'shared'}_{workers}"
    out = work / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if impl == "old":
        env["PYTHONPATH"] = str(old_pkg)
        workers = None  # no such key before
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--steps", str(steps), "--out", str(out)]
    if data:
        cmd += ["--data", str(data)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO / "bench"))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"{tag} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--old-scales", type=int, nargs="*", default=[1, 10])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--share-steps", type=int, default=30)
    ap.add_argument("--work", default="/tmp/lamflow_data_scale")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="water_small", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old_pkg = old_checkout(work) if args.old_scales else None
    print(f"cpu: {os.cpu_count()} cores, 1 torch thread per process; {args.steps} steps of se_e2_a "
          f"(rcut 6, neuron [10, 20, 40], fitting [32, 32, 32]) on water_h2o tiled; batch 1 frame of 192 atoms", flush=True)
    rows = {}
    for s in sorted(set(args.scales) | set(args.old_scales)):
        t = time.time()
        d = tile(work, s)
        size = sum(f.stat().st_size for f in d.rglob("*.npy")) / 2**20
        print(f"  data {s}x: {320 * s} frames, {size:.0f} MB on disk (tiled in {time.time() - t:.0f} s)", flush=True)
        if s in args.scales:
            rows[("new", s)] = run_child("new", "water_small", d, args.steps, work, old_pkg)
        if s in args.old_scales:
            rows[("old", s)] = run_child("old", "water_small", d, args.steps, work, old_pkg)
    print(f"\n{'impl':>4} {'scale':>6} {'frames':>8} {'peak RSS MB':>12} {'worker RSS':>11} {'1st step CPU s':>15} "
          f"{'(wall s)':>9} {'CPU ms/step':>12} {'worker ms/step':>15} {'steps/s wall':>13}")
    for (impl, s), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{impl:>4} {s:>5}x {320 * s:>8} {r['peak_rss_mb']:>12.0f} {r['worker_rss_mb']:>11.0f} "
              f"{r['first_step_cpu_s']:>15.2f} {r['first_step_wall_s']:>9.1f} {r['cpu_ms_per_step']:>12.1f} "
              f"{r['worker_cpu_ms_per_step']:>15.1f} {r['steps_per_s']:>13.2f}")
    new = {s: r for (i, s), r in rows.items() if i == "new"}
    if 1 in new and len(new) > 1:
        big = max(new)
        print(f"\nnew {big}x / new 1x: peak RSS {new[big]['peak_rss_mb'] / new[1]['peak_rss_mb']:.2f}x (goal <= 1.2), "
              f"time to first step {new[big]['first_step_cpu_s'] / new[1]['first_step_cpu_s']:.2f}x CPU, "
              f"{new[big]['first_step_wall_s'] / new[1]['first_step_wall_s']:.2f}x wall (goal <= 2)")
    if 1 in new and ("old", 1) in rows:
        old = rows[("old", 1)]
        print(f"1x, CPU per step of the training process: old / new = {old['cpu_ms_per_step'] / new[1]['cpu_ms_per_step']:.2f} "
              f"(>= 1: new not slower); wall steps/s new / old = {new[1]['steps_per_s'] / old['steps_per_s']:.2f}")
    print(f"\nshare of a CPU training step outside forward/backward/optimizer (data + neighbour list), CPU time of the "
          f"training process, {args.share_steps} steps:")
    print(f"{'case':>16} {'impl':>14} {'CPU ms/step':>12} {'worker ms/step':>15} {'outside':>8}")
    for case, label in (("water_full", "water se_e2_a"), ("ch4_dpa2", "CH4 small DPA-2")):
        for impl, workers in (("old", None), ("new", 0), ("new", 1)):
            if impl == "old" and old_pkg is None:
                continue
            r = run_child(impl, case, None, args.share_steps, work, old_pkg, workers)
            name = "old" if impl == "old" else f"new workers={workers}"
            print(f"{label:>16} {name:>14} {r['cpu_ms_per_step']:>12.1f} {r['worker_cpu_ms_per_step']:>15.1f} "
                  f"{100 * r['outside_share']:>7.1f}%", flush=True)


if __name__ == "__main__":
    main()
