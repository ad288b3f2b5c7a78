#!/usr/bin/env python
"""Neighbour lists per batch, side by side in one run: the numpy/cKDTree reference (build_graph per
frame, padded into a batch as collate pads it: `batch_graph_reference`) against the torch
implementation (`batch_graph_torch`) on the CPU, and on CUDA when a GPU is present.

Cases (periodic water, float64 coordinates):
    water 192       water_h2o valid, frames 0..B-1
    water_dplr 384  water_dplr_384 valid
    water 1536      water_h2o valid replicated 2x2x2
Request sets:
    se_e2_a         rcut 6, typed sel [46, 92] (deepmd-kit's water example)
    dpa2-paper      the three lists of templates/dpa2-paper.yaml: repinit 6.0/120, three-body 4.0/48,
                    repformer 4.0/48, all mixed

Each round times every method once per case (alternating, so machine load hits all alike); a
figure is the best time over the rounds (the least disturbed call), the median in parentheses.

    python bench/nlist_speed.py [--rounds 7] [--batch 1 4] [--threads 1] [--cases water192 dplr384 water1536]

Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from lamflow.model.data.batch_neighbors import batch_graph_reference, batch_graph_torch
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.data.systems import load_system

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
TYPE_MAP = ["O", "H"]
REQUESTS = {
    "se_e2_a": [NlistRequest(6.0, (46, 92), False)],
    "dpa2-paper": [NlistRequest(6.0, (120,), True), NlistRequest(4.0, (48,), True), NlistRequest(4.0, (48,), True)],
}


def replicate(coord: np.ndarray, box: np.ndarray, atype: np.ndarray, n: int):
    shifts = np.array([(i, j, k) for i in range(n) for j in range(n) for k in range(n)], dtype=float) @ box
    return (coord[None] + shifts[:, None]).reshape(-1, 3), box * n, np.tile(atype, n**3)


def cases(names: list[str], batch: int):
    """name -> (coord [nf, nloc, 3], atype [nf, nloc], box [nf, 3, 3]) as float64 CPU tensors."""
    water = load_system(DATA / "water_h2o" / "valid", TYPE_MAP)[0]
    dplr = load_system(DATA / "water_dplr_384" / "valid", TYPE_MAP)[0]
    out = {}
    for name in names:
        if name == "water192":
            s, ks = water, range(batch)
            frames = [(s.coord[k], s.box[k], s.atype) for k in ks]
        elif name == "dplr384":
            frames = [(dplr.coord[k % dplr.nframes], dplr.box[k % dplr.nframes], dplr.atype) for k in range(batch)]
        elif name == "water1536":
            frames = [replicate(water.coord[k], water.box[k], water.atype, 2) for k in range(batch)]
        else:
            raise SystemExit(f"unknown case {name!r}")
        coord = torch.as_tensor(np.stack([f[0] for f in frames]))
        box = torch.as_tensor(np.stack([f[1] for f in frames]))
        atype = torch.as_tensor(np.stack([f[2] for f in frames]))
        out[f"{name} x{batch}"] = (coord, atype, box)
    return out


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def cuda_checks(all_cases) -> None:
    """The CUDA lists equal the CPU ones, and the host syncs of one call (torch's sync debug mode)."""
    import warnings

    for c, (coord, atype, box) in all_cases.items():
        for r, reqs in REQUESTS.items():
            pbc = torch.ones(len(atype), dtype=torch.bool)
            ref = batch_graph_torch(coord, atype, box, pbc, reqs)
            x, t, bx, p = coord.cuda(), atype.cuda(), box.cuda(), pbc.cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = batch_graph_torch(x, t, bx, p, reqs)
            torch.cuda.set_sync_debug_mode("default")
            same = torch.equal(got.mapping.cpu(), ref.mapping) and all(
                torch.equal(a.cpu(), b) for a, b in zip(got.nlists, ref.nlists))
            print(f"# {c} {r}: CUDA lists == CPU lists: {same}; host syncs in one call: {len(w)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=["water192", "dplr384", "water1536"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    methods = {"numpy/cKDTree": ("cpu", batch_graph_reference), "torch cpu": ("cpu", batch_graph_torch)}
    if cuda:
        methods["torch cuda"] = ("cuda", batch_graph_torch)
    all_cases = {}
    for b in args.batch:
        all_cases.update(cases(args.cases, b))
    times = {(c, r, m): [] for c in all_cases for r in REQUESTS for m in methods}
    for rnd in range(args.rounds + 1):  # round 0 warms up (CUDA context, kernels) and is not counted
        for c, (coord, atype, box) in all_cases.items():
            for r, reqs in REQUESTS.items():
                for m, (dev, fn) in methods.items():
                    x, t, bx = coord.to(dev), atype.to(dev), box.to(dev)
                    pbc = torch.ones(len(t), dtype=torch.bool, device=dev)
                    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
                    dt = timed(lambda: fn(x, t, bx, pbc, reqs), sync)
                    if rnd:
                        times[(c, r, m)].append(dt)
    if cuda:
        cuda_checks(all_cases)
    print(f"# neighbour lists per batch, {args.threads} CPU thread(s), torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if cuda else ", no CUDA") + f"; best of {args.rounds} rounds (median)")
    head = "| case | requests | " + " | ".join(f"{m} ms" for m in methods) + " | numpy / torch cpu |" + (
        " numpy / torch cuda |" if cuda else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in all_cases:
        for r in REQUESTS:
            best = {m: min(times[(c, r, m)]) for m in methods}
            med = {m: float(np.median(times[(c, r, m)])) for m in methods}
            cells = " | ".join(f"{1e3 * best[m]:.2f} ({1e3 * med[m]:.2f})" for m in methods)
            ratio = f" {best['numpy/cKDTree'] / best['torch cpu']:.2f} |"
            if cuda:
                ratio += f" {best['numpy/cKDTree'] / best['torch cuda']:.1f} |"
            print(f"| {c} | {r} | {cells} |{ratio}")


if __name__ == "__main__":
    main()
