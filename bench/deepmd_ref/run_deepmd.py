#!/usr/bin/env python
"""Train / freeze / test (/ compress / time inference) one deepmd-kit 3.2.0 model.

Run with the python of the reference venv made by ``setup_venv.sh``::

    DPY=$(bash bench/deepmd_ref/setup_venv.sh | tail -1)
    $DPY bench/deepmd_ref/run_deepmd.py --input bench/deepmd_ref/examples/ch4_se_e2_a.json \
        --workdir /tmp/dp_ch4 --test-systems /work/shared/data/ch4_pbe/valid --threads 2 \
        [--compress] [--infer-bench /work/shared/data/ch4_pbe/valid --frames 50]

Prints exactly ONE JSON line on stdout (everything else goes to stderr and to log files in
--workdir: train.log, freeze.log, test.log, compress.log, test_compressed.log)::

    {"steps_per_s", "s_per_step", "train_wall_s", "rmse_e_per_atom" (eV/atom), "rmse_f" (eV/A),
     "n_params", ... extras}

``s_per_step`` is deepmd's own "average training time: X s/batch" (first 10 batches excluded by
deepmd), ``train_wall_s`` is the wall time of the whole ``dp --pt train`` process (incl. start-up,
data statistics, validation, checkpoint writing).  For several test systems the RMSEs are the
"weighted average of errors" that ``dp test`` prints.  Exit status is non-zero if any step fails
(the JSON line is still printed, with an "error" field).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
RE_AVG = re.compile(r"average training time:\s*" + NUM + r"\s*s/batch")
RE_E_ATOM = re.compile(r"Energy RMSE/Natoms\s*:\s*" + NUM)
RE_E = re.compile(r"Energy RMSE\s*:\s*" + NUM)
RE_F = re.compile(r"Force\s+RMSE\s*:\s*" + NUM)
RE_V_ATOM = re.compile(r"Virial RMSE/Natoms\s*:\s*" + NUM)
RE_NTEST = re.compile(r"number of test data\s*:\s*(\d+)")
WEIGHTED = "weighted average of errors"


def log(msg: str) -> None:
    print(f"[run_deepmd] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="deepmd-kit input.json")
    p.add_argument("--workdir", required=True, help="directory to train in (created)")
    p.add_argument("--test-systems", nargs="+", default=None,
                   help="systems for `dp test` (default: the validation_data systems of the input)")
    p.add_argument("--test-frames", type=int, default=1_000_000,
                   help="`dp test -n` (frames per system; default: all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=None, help="override training.numb_steps")
    p.add_argument("--train-systems", nargs="+", default=None, help="override training_data.systems")
    p.add_argument("--valid-systems", nargs="+", default=None, help="override validation_data.systems")
    p.add_argument("--neighbor-stat", action="store_true",
                   help="do NOT pass --skip-neighbor-stat (lets deepmd compute sel / min_nbor_dist)")
    p.add_argument("--compress", action="store_true",
                   help="also `dp --pt compress -i frozen.pth -o compressed.pth -t input.json` + test it")
    p.add_argument("--infer-bench", metavar="SYSTEM", default=None,
                   help="time DeepPot.eval one frame at a time on this system")
    p.add_argument("--frames", type=int, default=50, help="frames for --infer-bench")
    p.add_argument("--infer-repeats", type=int, default=2,
                   help="timed passes over the --frames frames after one warm-up pass")
    p.add_argument("--init-model", default=None, help="start training from this checkpoint (dp --init-model)")
    p.add_argument("--skip-train", action="store_true",
                   help="reuse model.ckpt.pt / frozen.pth already in --workdir")
    p.add_argument("--dp", default=None, help="dp executable (default: the one next to this python)")
    return p.parse_args(argv)


def find_dp(explicit: str | None) -> str:
    if explicit:
        return explicit
    cand = Path(sys.executable).parent / "dp"
    if cand.exists():
        return str(cand)
    found = shutil.which("dp")
    if not found:
        raise SystemExit("cannot find `dp`; run with the deepmd venv's python or pass --dp")
    return found


def run(cmd: list[str], cwd: Path, env: dict, logname: str) -> tuple[float, str]:
    """Run cmd in cwd, tee combined output to cwd/logname; return (wall_s, output)."""
    log("$ " + " ".join(cmd) + f"   (log: {cwd / logname})")
    t0 = time.perf_counter()
    with open(cwd / logname, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    out = (cwd / logname).read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc={proc.returncode}) after {wall:.1f} s:\n{tail}")
    log(f"  done in {wall:.1f} s")
    return wall, out


def last_float(regex: re.Pattern, text: str) -> float | None:
    m = regex.findall(text)
    return float(m[-1]) if m else None


def parse_test(out: str) -> dict:
    """Parse `dp test` output; with several systems use the weighted-average block."""
    block = out.split(WEIGHTED)[-1] if WEIGHTED in out else out
    res = {
        "rmse_e_per_atom": last_float(RE_E_ATOM, block),
        "rmse_e": last_float(RE_E, block),
        "rmse_f": last_float(RE_F, block),
        "rmse_v_per_atom": last_float(RE_V_ATOM, block),
        "n_test_frames": sum(int(x) for x in RE_NTEST.findall(out)),
        "n_test_systems": max(1, len(RE_NTEST.findall(out))),
    }
    return res


def resolve_systems(systems, base: Path) -> list[str]:
    if isinstance(systems, str):
        systems = [systems]
    return [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in systems]


def prepare_input(args, workdir: Path) -> dict:
    src = Path(args.input).resolve()
    cfg = json.loads(src.read_text())
    tr = cfg["training"]
    base = src.parent
    tr["training_data"]["systems"] = resolve_systems(
        args.train_systems or tr["training_data"]["systems"], Path.cwd() if args.train_systems else base)
    if "validation_data" in tr or args.valid_systems:
        vd = tr.setdefault("validation_data", {"batch_size": 1, "numb_btch": 1})
        vd["systems"] = resolve_systems(args.valid_systems or vd["systems"],
                                        Path.cwd() if args.valid_systems else base)
    if args.steps is not None:
        tr["numb_steps"] = args.steps
        tr["save_freq"] = min(tr.get("save_freq", args.steps), args.steps)
    (workdir / "input.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def count_params(frozen: Path) -> int:
    import deepmd.pt  # noqa: F401  (registers torch.ops.deepmd before jit.load)
    import torch

    m = torch.jit.load(str(frozen), map_location="cpu")
    return int(sum(p.numel() for p in m.parameters()))


def load_system(path: str, nframes: int):
    import numpy as np

    sysdir = Path(path)
    atype = np.loadtxt(sysdir / "type.raw", dtype=int, ndmin=1)
    coords, boxes = [], []
    nopbc = (sysdir / "nopbc").exists()
    for s in sorted(sysdir.glob("set.*")):
        coords.append(np.load(s / "coord.npy").reshape(-1, len(atype) * 3))
        if not nopbc:
            boxes.append(np.load(s / "box.npy").reshape(-1, 9))
        if sum(len(c) for c in coords) >= nframes:
            break
    coord = np.concatenate(coords)[:nframes].astype(np.float64)
    box = None if nopbc else np.concatenate(boxes)[:nframes].astype(np.float64)
    return coord, box, atype


def infer_bench(model: Path, system: str, nframes: int, repeats: int = 2) -> dict:
    """DeepPot.eval one frame at a time.

    Pass 0 over all frames is a warm-up (TorchScript's profiling executor re-specialises for every
    new number of ghost atoms, so the first visit of each frame is slow); it is reported as
    ``cold``.  Then ``repeats`` timed passes; mean and median over those calls are reported.
    """
    from deepmd.infer import DeepPot

    coord, box, atype = load_system(system, nframes)
    dp = DeepPot(str(model))
    n = len(coord)

    def one_pass() -> list[float]:
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            dp.eval(coord[i:i + 1], None if box is None else box[i:i + 1], atype)
            ts.append(time.perf_counter() - t0)
        return ts

    cold = one_pass()
    times = [t for _ in range(repeats) for t in one_pass()]
    times.sort()
    return {"ms_per_frame": 1e3 * sum(times) / len(times), "ms_per_frame_median": 1e3 * times[len(times) // 2],
            "ms_per_frame_cold": 1e3 * sum(cold) / n, "frames": n, "natoms": int(len(atype))}


def calib_gflops(threads: int) -> float:
    """fp64 matmul throughput (best of 5), to judge machine noise between runs."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 512, dtype=torch.float64)
    b = torch.randn(512, 512, dtype=torch.float64)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 512 ** 3 / best / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    n = str(args.threads)
    # must be set before deepmd.pt is imported (deepmd.pt.utils.env reads them at import time)
    os.environ.update({"OMP_NUM_THREADS": n, "DP_INTRA_OP_PARALLELISM_THREADS": n,
                       "DP_INTER_OP_PARALLELISM_THREADS": "1", "NUM_WORKERS": "0"})
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    dp = find_dp(args.dp)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"input": str(Path(args.input).resolve()), "workdir": str(workdir), "threads": args.threads}
    rc = 0
    try:
        res["calib_gflops_start"] = round(calib_gflops(args.threads), 1)
        cfg = prepare_input(args, workdir)
        res["numb_steps"] = cfg["training"]["numb_steps"]
        res["descriptor"] = cfg["model"].get("descriptor", {}).get("type")
        if not args.skip_train:
            cmd = [dp, "--pt", "train", "input.json"]
            if not args.neighbor_stat:
                cmd.append("--skip-neighbor-stat")
            if args.init_model:
                cmd += ["--init-model", str(Path(args.init_model).resolve())]
            wall, out = run(cmd, workdir, env, "train.log")
            s = last_float(RE_AVG, out)
            res.update({"s_per_step": s, "steps_per_s": (1.0 / s) if s else None, "train_wall_s": round(wall, 2)})
            if s is None:
                log("WARNING: no 'average training time' line in train.log")
            lc = workdir / "lcurve.out"
            if lc.exists():
                lines = [ln for ln in lc.read_text().splitlines() if ln.strip()]
                res["lcurve_header"] = lines[0].lstrip("#").split()
                res["lcurve_last"] = [float(x) for x in lines[-1].split()]
            wall, _ = run([dp, "--pt", "freeze", "-o", "frozen.pth"], workdir, env, "freeze.log")
            res["freeze_s"] = round(wall, 2)
        frozen = workdir / "frozen.pth"
        res["n_params"] = count_params(frozen)

        test_systems = resolve_systems(args.test_systems, Path.cwd()) if args.test_systems else \
            cfg["training"]["validation_data"]["systems"]
        (workdir / "test_systems.txt").write_text("\n".join(test_systems) + "\n")
        res["test_systems"] = test_systems

        def dp_test(model: str, logname: str) -> tuple[float, dict]:
            cmd = [dp, "--pt", "test", "-m", model, "-n", str(args.test_frames)]
            cmd += ["-s", test_systems[0]] if len(test_systems) == 1 else ["-f", "test_systems.txt"]
            wall, out = run(cmd, workdir, env, logname)
            return wall, parse_test(out)

        wall, t = dp_test("frozen.pth", "test.log")
        res.update(t)
        res["test_s"] = round(wall, 2)

        compressed = workdir / "compressed.pth"
        if args.compress:
            try:
                wall, _ = run([dp, "--pt", "compress", "-i", "frozen.pth", "-o", "compressed.pth",
                               "-t", "input.json"], workdir, env, "compress.log")
                res["compress_s"] = round(wall, 2)
                wall, t = dp_test("compressed.pth", "test_compressed.log")
                res.update({f"{k}_compressed": v for k, v in t.items() if k.startswith("rmse")})
            except RuntimeError as e:
                res["compress_error"] = str(e).splitlines()[-1][:400]
                log(f"compress failed: {e}")
                compressed.unlink(missing_ok=True)
                rc = 2

        if args.infer_bench:
            sysp = resolve_systems([args.infer_bench], Path.cwd())[0]
            b = infer_bench(frozen, sysp, args.frames, args.infer_repeats)
            res.update({"infer_ms_per_frame": b["ms_per_frame"], "infer_ms_per_frame_median": b["ms_per_frame_median"],
                        "infer_ms_per_frame_cold": b["ms_per_frame_cold"],
                        "infer_frames": b["frames"], "infer_natoms": b["natoms"]})
            if args.compress and compressed.exists():
                bc = infer_bench(compressed, sysp, args.frames, args.infer_repeats)
                res.update({"infer_ms_per_frame_compressed": bc["ms_per_frame"],
                            "infer_ms_per_frame_compressed_median": bc["ms_per_frame_median"],
                            "infer_ms_per_frame_compressed_cold": bc["ms_per_frame_cold"],
                            "infer_speedup_compressed": b["ms_per_frame"] / bc["ms_per_frame"],
                            "infer_speedup_compressed_median": b["ms_per_frame_median"] / bc["ms_per_frame_median"]})
        res["calib_gflops_end"] = round(calib_gflops(args.threads), 1)
    except Exception as e:  # noqa: BLE001 - report in the JSON line, exit non-zero
        res["error"] = f"{type(e).__name__}: {e}"[-2000:]
        log(res["error"])
        rc = 1
    print(json.dumps(res), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
