#!/usr/bin/env python
"""Inference speed, side by side in one run: energy + forces (+ virial) per second on periodic water
of 192 atoms (water_h2o valid, frame 0) and 1536 atoms (its 2x2x2 replication) for

    teacher      lamflow se_atten (DPA-1: sel 120, neuron [25,50,100], axis 16, attn 128 x 2 layers,
                 fitting [240,240,240]); random weights, statistics from the water data
    student      lamflow se_e2_a (deepmd-kit's water example: sel [46,92], neuron [25,50,100],
                 axis 16, type_one_side, fitting [240,240,240]); deepmd-kit's trained weights,
                 imported (so both sides evaluate the same function), else trained here
    compressed   the student after `lamflow compress` (stride 0.01, extrapolate 5)
    dp frozen    deepmd-kit 3.2.0, the same se_e2_a (`dp --pt freeze`)
    dp compressed  deepmd-kit 3.2.0 `dp --pt compress` of it (C++ tabulate_fusion kernels)

Every call is a full evaluation from numpy coordinates to numpy energy/forces/virial, the
neighbour list included (lamflow: `infer.evaluate`; deepmd-kit: `DeepPot.eval`). deepmd-kit runs
in its own venv (bench/deepmd_ref/setup_venv.sh) as a worker process that this script drives
over a pipe, so both sides are timed in alternating rounds under the same machine load; a
model's figure is its best call over all rounds (the CPU is shared and noisy: the best call is
the least disturbed one), the round medians are printed too. Also printed: the share of
lamflow's time outside the model (neighbour list, batching, copies) and how much compression
changes energies and forces.

    python bench/infer_speed.py [--threads 1] [--rounds 5] [--workdir /tmp/lamflow-bench]
                                [--deepmd-python PATH] [--no-deepmd]

Not run by CI. The deepmd-kit models are trained once (100 steps, bench/deepmd_ref/run_deepmd.py
--compress, ~3 min) and reused from --workdir.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
DP_INPUT = REPO / "bench" / "deepmd_ref" / "examples" / "water_se_e2_a.json"
TEACHER = {"type": "se_atten", "rcut": 6.0, "rcut_smth": 0.5, "sel": 120, "neuron": [25, 50, 100], "axis_neuron": 16,
           "tebd_dim": 8, "attn": 128, "attn_layer": 2, "attn_dotr": True, "type_one_side": True, "seed": 1}


def log(msg: str) -> None:
    print(f"[infer_speed] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- deepmd-kit worker (runs in the deepmd venv)


def worker(models: list[str], threads: int) -> None:
    """Load DeepPot models, then answer one JSON request per stdin line:
    {"model": i, "system": npz, "reps": k} -> {"times": [s...], "energy": E, "force": [[...] first atoms]}.
    The first request for a (model, system) pair is preceded by three untimed warm-up calls."""
    os.environ.update({"OMP_NUM_THREADS": str(threads), "DP_INTRA_OP_PARALLELISM_THREADS": str(threads),
                       "DP_INTER_OP_PARALLELISM_THREADS": "1"})
    import warnings

    warnings.filterwarnings("ignore")
    from deepmd.infer import DeepPot

    dps = [DeepPot(m) for m in models]
    print(json.dumps({"ready": True}), flush=True)
    cache, warm = {}, set()
    for line in sys.stdin:
        req = json.loads(line)
        if req["system"] not in cache:
            z = np.load(req["system"])
            cache[req["system"]] = (z["coord"].reshape(1, -1), z["box"].reshape(1, 9), z["atype"])
        coord, box, atype = cache[req["system"]]
        dp = dps[req["model"]]
        if (req["model"], req["system"]) not in warm:  # TorchScript re-specialises on the first calls of a new size
            for _ in range(3):
                dp.eval(coord, box, atype)
            warm.add((req["model"], req["system"]))
        times = []
        for _ in range(req["reps"]):
            t0 = time.perf_counter()
            e, f, v = dp.eval(coord, box, atype)[:3]
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times, "energy": float(np.ravel(e)[0]), "force": np.asarray(f).reshape(-1, 3)[:4].tolist(),
                          "virial": np.ravel(v)[:9].tolist()}), flush=True)


class DeepmdWorker:
    def __init__(self, python: str, models: list[str], threads: int, logfile: Path):
        self.log = open(logfile, "w")
        self.p = subprocess.Popen([python, __file__, "--worker", "--threads", str(threads), *models], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready = self.p.stdout.readline()
        if not ready:
            raise RuntimeError(f"deepmd-kit worker failed to start (see {logfile})")

    def time(self, model: int, system: str, reps: int) -> dict:
        self.p.stdin.write(json.dumps({"model": model, "system": system, "reps": reps}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)
        self.log.close()


def find_deepmd_python(explicit: str | None) -> str | None:
    cands = [explicit] if explicit else [str(Path.home() / ".cache/lamflow/deepmd-venv/bin/python"),
                                         *sorted(glob.glob("/tmp/dpref/venv-*/bin/python"))]
    for c in cands:
        if c and Path(c).exists():
            ok = subprocess.run([c, "-c", "import deepmd.pt, deepmd.infer"], capture_output=True).returncode == 0
            if ok:
                return c
    return None


def deepmd_models(python: str, workdir: Path, threads: int, steps: int) -> dict:
    """frozen.pth, compressed.pth and model.ckpt.pt of deepmd-kit's water se_e2_a (trained once)."""
    wd = workdir / "deepmd_water_se_e2_a"
    want = {k: wd / k for k in ("model.ckpt.pt", "frozen.pth", "compressed.pth")}
    if not all(p.exists() for p in want.values()):
        log(f"training deepmd-kit's se_e2_a for {steps} steps + freeze + compress in {wd} (a few minutes)")
        cmd = [python, str(REPO / "bench/deepmd_ref/run_deepmd.py"), "--input", str(DP_INPUT), "--workdir", str(wd),
               "--threads", str(threads), "--steps", str(steps), "--compress", "--test-frames", "5",
               "--train-systems", *[str(DATA / "water_h2o/train" / d) for d in ("data_0", "data_1", "data_2")],
               "--valid-systems", str(DATA / "water_h2o/valid"), "--test-systems", str(DATA / "water_h2o/valid")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0 or not all(p.exists() for p in want.values()):
            raise RuntimeError(f"run_deepmd.py failed (rc {out.returncode}): {out.stdout[-500:]} {out.stderr[-1500:]}")
    return {k: str(v) for k, v in want.items()}


# ----------------------------------------------------------------------------- lamflow side


def calib_gflops() -> float:
    import torch

    a, b = torch.randn(512, 512, dtype=torch.float64), torch.randn(512, 512, dtype=torch.float64)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 512**3 / best / 1e9


def water_systems(rep: int):
    from lamflow.model.data.systems import load_systems

    s = load_systems(str(DATA / "water_h2o" / "valid"), ["O", "H"])[0]
    c, b, a = s.coord[0], s.box[0], s.atype
    shifts = np.array([(i, j, k) for i in range(rep) for j in range(rep) for k in range(rep)], dtype=float)
    big = (np.concatenate([c + sh @ b for sh in shifts]), b * rep, np.tile(a, len(shifts)))
    return {len(a): (c, b, a), len(big[2]): big}, s


def student_model(paths: dict | None, workdir: Path, steps: int, log_fn=log):
    """deepmd-kit's trained weights through lamflow's importer; else the same config trained by lamflow."""
    from lamflow.model.io.checkpoint import load_model

    if paths:
        try:
            return load_model(paths["model.ckpt.pt"]).eval(), "deepmd-kit weights (imported)"
        except Exception as e:  # importer missing or refusing: train our own below
            log_fn(f"could not import deepmd-kit's checkpoint ({type(e).__name__}: {e}); training lamflow's own")
    from lamflow.model.training.config import TrainConfig
    from lamflow.model.training.trainer import train

    raw = json.loads(DP_INPUT.read_text())
    raw["training"]["numb_steps"] = steps
    raw["training"].pop("disp_file", None)  # deepmd-kit only
    raw["training"]["training_data"]["systems"] = [str(DATA / "water_h2o/train" / d) for d in ("data_0", "data_1", "data_2")]
    raw["training"]["validation_data"]["systems"] = [str(DATA / "water_h2o/valid")]
    res = train(TrainConfig.model_validate(raw), workdir / "lamflow_student", log=lambda *a: None)
    return load_model(res.checkpoint).eval(), f"trained by lamflow ({steps} steps)"


def teacher_model(stat_systems):
    import torch

    from lamflow.model.data.batch import DataSet
    from lamflow.model.nn.config import ModelConfig
    from lamflow.model.nn.potential import EnergyModel
    from lamflow.model.training.stats import fit_statistics

    m = EnergyModel(ModelConfig(type_map=["O", "H"], descriptor=TEACHER, fitting_net={"neuron": [240, 240, 240], "seed": 1}))
    fit_statistics(m, DataSet(stat_systems, m.nlist_requests(), 1, torch.float64), 4, 1e-2, log=lambda *a: None)
    return m.eval()


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def breakdown(model, coord, box, atype, reps: int) -> dict:
    """Best times (s) of the parts of one `evaluate` call: neighbour list, batching, model (forward + backward)."""
    from lamflow.model.data.batch import collate
    from lamflow.model.data.neighbor import build_graph
    from lamflow.model.data.systems import System
    from lamflow.model.nn.infer import evaluate
    from lamflow.model.nn.potential import predict

    reqs = model.nlist_requests()
    s = System("x", list(model.type_map), atype, coord[None], box[None])
    g = build_graph(coord, box, atype, reqs)
    batch = collate([(s, 0, g)], model.dtype)
    out = {"total": best_time(lambda: evaluate(model, coord[None], box[None], atype), reps),
           "neighbour_list": best_time(lambda: build_graph(coord, box, atype, reqs), reps),
           "batching": best_time(lambda: collate([(s, 0, g)], model.dtype), reps),
           "model": best_time(lambda: predict(model, batch, forces=True, virial=True), reps)}
    out["neural_nets"] = nn_time(model, batch, reps)
    return out


def nn_time(model, batch, reps: int) -> float:
    """Best time (s) of the neural networks alone, forward + backward on fixed inputs: the embedding
    nets (or their tables) with the R^T G contraction, and the fitting nets."""
    import torch

    from lamflow.model.nn.potential import extended_inputs

    coord_ext, atype_ext = extended_inputs(batch, model.dtype)
    nlist = batch.nlists[0]
    atype = atype_ext[:, : nlist.shape[1]]
    desc = model.descriptor
    tabulated = hasattr(desc, "pair_terms")
    with torch.no_grad():
        if tabulated:  # the fused path starts from the coordinates (env matrix included)
            R = coord_ext
            D = desc.features(coord_ext, atype_ext, batch.nlists)
        else:
            R, _, _ = desc.env(coord_ext, atype, nlist)
            D = desc(coord_ext, atype_ext, batch.nlists).descriptor
    R = R.detach().requires_grad_(True)
    D = D.detach().requires_grad_(True)

    def embed():  # gradients w.r.t. the inputs only, as for forces
        if tabulated:
            T = desc.features(R, atype_ext, batch.nlists)
        else:
            T = R.transpose(-1, -2) @ desc.embed(R[..., 0], nlist >= 0, atype)
        torch.autograd.grad(T.sum(), R)

    def fit():
        torch.autograd.grad(model.fitting(D, atype).sum(), D)

    return best_time(embed, reps) + best_time(fit, reps)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="CPU threads on both sides (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    p.add_argument("--reps", type=int, default=3, help="calls per model per round (teacher: 1)")
    p.add_argument("--teacher-rounds", type=int, default=2, help="rounds that time the (slow) teacher on the large cell")
    p.add_argument("--replicate", type=int, default=2, help="n x n x n copies of the 192-atom cell for the large system")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lamflow-bench"))
    p.add_argument("--deepmd-python", default=None, help="python of the deepmd-kit venv (default: search the usual places)")
    p.add_argument("--no-deepmd", action="store_true", help="lamflow models only")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("models", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.models, args.threads)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from lamflow.model.data.batch import min_neighbor_distance
    from lamflow.model.data.systems import load_systems
    from lamflow.model.nn.infer import evaluate
    from lamflow.model.tasks.compress import compress_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"threads": args.threads, "rounds": args.rounds, "loadavg_start": os.getloadavg(),
                 "calib_gflops_start": calib_gflops(), "cpu": os.cpu_count()}
    dpy = None if args.no_deepmd else find_deepmd_python(args.deepmd_python)
    if not args.no_deepmd and dpy is None:
        log("no deepmd-kit venv found (bench/deepmd_ref/setup_venv.sh); timing lamflow only")
    dp_paths = deepmd_models(dpy, args.workdir, 2, args.train_steps) if dpy else None

    systems, valid = water_systems(args.replicate)
    train_sys = load_systems(str(DATA / "water_h2o" / "train"), ["O", "H"])
    student, origin = student_model(dp_paths, args.workdir, args.train_steps)
    t0 = time.perf_counter()
    rmin = min_neighbor_distance([s.subset(range(0, s.nframes, 4)) for s in train_sys], student.descriptor.cfg.rcut)
    compressed = compress_model(student, rmin)
    res["compress_s"] = time.perf_counter() - t0
    teacher = teacher_model([s.subset(range(0, s.nframes, 40)) for s in train_sys])
    models = {"teacher (se_atten)": teacher, "student (se_e2_a)": student, "compressed student": compressed}
    res["student_origin"] = origin
    res["min_nbor_dist"] = rmin
    log(f"student: {origin}; compressed with min_nbor_dist {rmin:.4f} A in {res['compress_s']:.1f} s "
        f"({compressed.descriptor.coef.shape[1]} rows)")

    # accuracy of compression: energies / forces over valid frames and the large cell
    de, df = 0.0, 0.0
    for k in range(0, valid.nframes, 16):
        a = evaluate(student, valid.coord[k : k + 1], valid.box[k : k + 1], valid.atype)
        b = evaluate(compressed, valid.coord[k : k + 1], valid.box[k : k + 1], valid.atype)
        de, df = max(de, abs(a["energy"][0] - b["energy"][0]) / valid.natoms), max(df, np.abs(a["force"] - b["force"]).max())
    res["compression_max_abs_de_eV_per_atom"], res["compression_max_abs_df_eV_per_A"] = de, df

    sysfiles = {}
    for n, (c, b, a) in systems.items():
        f = args.workdir / f"water_{n}.npz"
        np.savez(f, coord=c, box=b, atype=a)
        sysfiles[n] = str(f)
    dp = None
    dp_names = []
    if dp_paths:
        dp = DeepmdWorker(dpy, [dp_paths["frozen.pth"], dp_paths["compressed.pth"]], args.threads,
                          args.workdir / "deepmd_worker.log")
        dp_names = ["dp frozen (se_e2_a)", "dp compressed"]

    # cross-check: the same function on both sides (when the weights were imported)
    checks = {}
    for n, (c, b, a) in systems.items():
        ours = {name: evaluate(m, c[None], b[None], a) for name, m in models.items() if "teacher" not in name}
        for i, name in enumerate(dp_names):
            r = dp.time(i, sysfiles[n], 1)
            checks[f"{n}: |E_lamflow - E_{name}| per atom"] = abs(ours["student (se_e2_a)"]["energy"][0] - r["energy"]) / n
            dF = ours["student (se_e2_a)"]["force"][0][:4] - np.array(r["force"])
            checks[f"{n}: max |F_lamflow - F_{name}| (4 atoms)"] = float(np.abs(dF).max())
    res["cross_checks"] = checks

    # alternating rounds
    best: dict = {}
    rounds: dict = {}
    res["breakdown_s"] = {}
    for r in range(args.rounds):
        for n, (c, b, a) in systems.items():
            for name, m in models.items():
                if "teacher" in name and n > 192 and r >= args.teacher_rounds:
                    continue
                reps = 1 if "teacher" in name else args.reps
                t = best_time(lambda: evaluate(m, c[None], b[None], a), reps)
                rounds.setdefault((name, n), []).append(t)
            for i, name in enumerate(dp_names):
                t = min(dp.time(i, sysfiles[n], args.reps)["times"])
                rounds.setdefault((name, n), []).append(t)
            for name in ("student (se_e2_a)", "compressed student"):
                parts = res["breakdown_s"].setdefault(f"{name} @ {n}", {})
                for k, v in breakdown(models[name], c, b, a, 1).items():
                    parts[k] = min(parts.get(k, float("inf")), v)
        log(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})")
    if dp:
        dp.close()
    for key, ts in rounds.items():
        best[key] = min(ts)
    res["best_s"] = {f"{k[0]} @ {k[1]}": v for k, v in best.items()}
    res["round_median_s"] = {f"{k[0]} @ {k[1]}": float(np.median(v)) for k, v in rounds.items()}
    res["loadavg_end"] = os.getloadavg()
    res["calib_gflops_end"] = calib_gflops()
    report(res, systems, models, dp_names, best, rounds)
    out = args.workdir / "infer_speed.json"
    out.write_text(json.dumps(res, indent=2, default=float))
    log(f"wrote {out}")
    return 0


def report(res, systems, models, dp_names, best, rounds) -> None:
    names = list(models) + dp_names
    print(f"threads {res['threads']}, {res['rounds']} rounds; load average {res['loadavg_start'][0]:.1f} -> "
          f"{res['loadavg_end'][0]:.1f}; fp64 matmul {res['calib_gflops_start']:.0f} -> {res['calib_gflops_end']:.0f} GFLOP/s")
    print(f"student: {res['student_origin']}; compression: max |dE| {res['compression_max_abs_de_eV_per_atom']:.1e} eV/atom, "
          f"max |dF| {res['compression_max_abs_df_eV_per_A']:.1e} eV/A, built in {res['compress_s']:.1f} s")
    for k, v in res["cross_checks"].items():
        print(f"  check {k}: {v:.1e}")
    print()
    head = f"{'model':<24}" + "".join(f"{f'{n} atoms: ms (median)':>28}{'calls/s':>9}" for n in systems)
    print(head)
    for name in names:
        row = f"{name:<24}"
        for n in systems:
            t = best.get((name, n))
            med = np.median(rounds[(name, n)]) if (name, n) in rounds else float("nan")
            row += f"{f'{1e3 * t:.1f} ({1e3 * med:.1f})':>28}{1 / t:>9.2f}" if t else f"{'-':>28}{'-':>9}"
        print(row)
    print()
    for n in systems:
        c = best[("compressed student", n)]
        parts = [f"vs student {best[('student (se_e2_a)', n)] / c:.2f}x",
                 f"vs teacher {best[('teacher (se_atten)', n)] / c:.1f}x"]
        for name in dp_names:
            parts.append(f"vs {name} {best[(name, n)] / c:.2f}x")
        if dp_names:
            parts.append(f"(dp compressed vs dp frozen {best[(dp_names[0], n)] / best[(dp_names[1], n)]:.2f}x)")
        print(f"{n} atoms, compressed student speed-up: " + ", ".join(parts))
    print()
    print("where lamflow's time goes (best calls): neighbour list / batching / model forward+backward / other;"
          " neural nets alone (embedding nets or tables + fitting, forward+backward)")
    for key, b in res["breakdown_s"].items():
        b["other"] = max(0.0, b["total"] - b["neighbour_list"] - b["batching"] - b["model"])
        b["outside_nn_share"] = max(0.0, 1 - b["neural_nets"] / b["total"])
        tot = b["total"]
        print(f"  {key:<28} {1e3 * tot:8.1f} ms: " + " / ".join(f"{100 * b[k] / tot:.0f}%" for k in
                                                             ("neighbour_list", "batching", "model", "other"))
              + f"; neural nets {100 * b['neural_nets'] / tot:.0f}%, outside them {100 * b['outside_nn_share']:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
