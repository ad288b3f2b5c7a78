#!/usr/bin/env python
"""Compression speed-up, side by side in one run: the quickstart's student (se_e2_a neuron [8, 16],
axis 4, fitting [32, 32], sel from the data) against its compressed form, on a CH4 frame
replicated to ~1000 atoms (examples/data/ch4_pbe, as the quickstart's compress stage times it).

Each round times one energy+force evaluation of each model in turn (alternating, so a busy
machine slows both alike), twice over: the full call (`infer.evaluate`: neighbour list, batching,
model) and the model alone (`potential.predict` on a fixed batch). Printed: the best and median
call of each, and the min / median / max of the per-round ratios. Also: max |dE|, |dF|, |dV|
between the two, in float64 and float32.

    python bench/compress_speed.py [--model STUDENT.ckpt] [--rounds 30] [--natoms 1000] [--threads 1]

Without --model the student has random weights and statistics from the CH4 data (timing does not
depend on the weights). Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CH4 = REPO / "examples" / "data" / "ch4_pbe" / "train"
STUDENT = {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [8, 16], "axis_neuron": 4, "seed": 1}


def student(system, precision: str):
    from lamflow.model.data.batch import DataSet
    from lamflow.model.nn.config import ModelConfig
    from lamflow.model.nn.potential import EnergyModel
    from lamflow.model.training.stats import fit_statistics, resolve_sel

    cfg = ModelConfig(type_map=["C", "H"], descriptor={**STUDENT, "precision": precision},
                      fitting_net={"neuron": [32, 32], "seed": 1, "precision": precision})
    cfg = cfg.model_copy(update={"descriptor": resolve_sel(cfg.descriptor, [system], 2)})
    model = EnergyModel(cfg)
    fit_statistics(model, DataSet([system.subset(range(20))], model.nlist_requests(), 2, torch.float64), 2, 1e-2,
                   log=lambda *a: None)
    return model.eval()


def rounds(fa, fb, n: int) -> np.ndarray:
    """[n, 2] wall times of fa, fb called alternately after a warm-up of both."""
    for _ in range(2):
        fa(), fb()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        out.append((t1 - t0, time.perf_counter() - t1))
    return np.array(out)


def line(what: str, t: np.ndarray) -> str:
    r = t[:, 0] / t[:, 1]
    return (f"{what:<22}{1e3 * t[:, 0].min():8.2f} ({1e3 * np.median(t[:, 0]):6.2f}){1e3 * t[:, 1].min():9.2f} "
            f"({1e3 * np.median(t[:, 1]):6.2f})   {t[:, 0].min() / t[:, 1].min():5.2f}x   "
            f"{r.min():5.2f} / {np.median(r):5.2f} / {r.max():5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an se_e2_a checkpoint (e.g. the quickstart's distilled student)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--natoms", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lamflow.model.data.batch import collate, min_neighbor_distance
    from lamflow.model.data.systems import System, load_systems
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.nn.infer import _graph, evaluate
    from lamflow.model.nn.potential import predict
    from lamflow.model.tasks.compress import compress_model
    from lamflow.model.tasks.lambench import grow

    s = load_systems(str(CH4), ["C", "H"])[0]
    dmin = min_neighbor_distance([s], 4.0)
    print(f"load average at start {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, {args.threads} thread(s)")
    for precision in ("float64", "float32"):
        model = load_model(args.model) if args.model and precision == "float64" else student(s, precision)
        if args.model and precision == "float32":
            continue
        cm = compress_model(model, dmin)
        coord, box, atype = grow(s, args.natoms, float(model.cfg.descriptor.rcut))
        frame = System("cell", list(model.type_map), atype, coord[None], box[None])
        batch = collate([(frame, 0, _graph(model, coord, box, atype))], model.dtype)
        a, b = evaluate(model, coord, box, atype), evaluate(cm, coord, box, atype)
        print(f"\n{precision}: {len(atype)} atoms, sel {list(model.cfg.descriptor.sel)}, min_nbor_dist {dmin:.3f} A; "
              f"max |dE| {np.abs(a['energy'] - b['energy']).max() / len(atype):.1e} eV/atom, "
              f"|dF| {np.abs(a['force'] - b['force']).max():.1e} eV/A, |dV| {np.abs(a['virial'] - b['virial']).max():.1e} eV")
        print(f"{'':<22}{'original ms (median)':>22}{'compressed ms (median)':>24}   best    round ratio min / median / max")
        full = rounds(lambda: evaluate(model, coord, box, atype, virial=False),
                      lambda: evaluate(cm, coord, box, atype, virial=False), args.rounds)
        print(line("evaluate (nlist incl.)", full))
        alone = rounds(lambda: predict(model, batch, forces=True), lambda: predict(cm, batch, forces=True), args.rounds)
        print(line("model alone", alone))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
