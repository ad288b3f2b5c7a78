#!/usr/bin/env python
"""Sample efficiency of fine-tuning: force RMSE on ch4_pbe valid vs number of CH4 training frames
(10, 25, 50, 100, 240), fine-tuned from a multi-task model pretrained on water / MAPbI3 / Si
(head `mapbi3`, which holds H and C) vs trained from scratch, with the same model, steps, seed,
learning-rate schedule and batches. Prints a table, writes JSON and a log-log PNG. Not run in CI.

    python bench/sample_efficiency.py [--frames 10 25 50 100 240] [--steps 150] [-o DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test helpers hold the data subsets and the pretraining config

import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import data_path  # noqa: E402
from multitask_helpers import (  # noqa: E402
    PRETRAIN_DESCRIPTOR,
    PRETRAIN_FITTING,
    multitask_config,
    pretrain_data,
    write_subset,
    write_yaml,
)

from lamflow.model.training.config import load_train_config  # noqa: E402
from lamflow.model.training.finetune import finetune  # noqa: E402
from lamflow.model.training.multitask import train_multitask  # noqa: E402
from lamflow.model.training.multitask_config import load_multitask_config  # noqa: E402
from lamflow.model.training.trainer import train  # noqa: E402

QUIET = lambda *a: None  # noqa: E731


def ch4_config(path: Path, train_dir: Path, steps: int):
    cfg = {"model": {"type_map": ["H", "C"], "descriptor": PRETRAIN_DESCRIPTOR, "fitting_net": {**PRETRAIN_FITTING, "seed": 3}},
           "learning_rate": {"start_lr": 0.003, "stop_lr": 0.00006, "decay_steps": max(1, steps // 10)},
           "training": {"training_data": {"systems": str(train_dir), "batch_size": 4},
                        "validation_data": {"systems": str(data_path("ch4_pbe", "valid")), "batch_size": 60},
                        "numb_steps": steps, "seed": 7, "disp_freq": steps, "save_freq": steps}}
    path.write_text(yaml.safe_dump(cfg))
    return load_train_config(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[10, 25, 50, 100, 240])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="lamflow-sample-eff-"))
    t0 = time.time()
    data = pretrain_data(out / "pretrain_data")
    cfg = multitask_config(data, steps=args.pretrain_steps, model_prob={"water": 1.0, "mapbi3": 3.0, "si": 0.5})
    pre = train_multitask(load_multitask_config(write_yaml(cfg, out / "pretrain.yaml")), out / "pretrain", log=QUIET)
    print(f"# pretrained in {time.time() - t0:.0f} s: {pre.checkpoint}", flush=True)
    rows = []
    print(f"{'frames':>6}  {'F RMSE scratch':>15}  {'F RMSE fine-tuned':>18}  {'E scratch meV/at':>17}  {'E fine-tuned':>13}")
    for n in args.frames:
        tr = write_subset(data_path("ch4_pbe", "train"), out / f"ch4_{n}", n, max(1, 240 // n))
        cfg = ch4_config(out / f"ch4_{n}.yaml", tr, args.steps)
        s = train(cfg, out / f"scratch_{n}", log=QUIET).metrics
        f = finetune(cfg, pre.checkpoint, out / f"ft_{n}", branch="mapbi3", log=QUIET).metrics
        rows.append({"frames": n, "scratch": s, "finetuned": f})
        print(f"{n:>6}  {s['rmse_f']:>15.4f}  {f['rmse_f']:>18.4f}  {1e3 * s['rmse_e_per_atom']:>17.2f}  "
              f"{1e3 * f['rmse_e_per_atom']:>13.2f}", flush=True)
    (out / "sample_efficiency.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (("scratch", "from scratch"), ("finetuned", "fine-tuned (pretrained)")):
        ax.plot([r["frames"] for r in rows], [r[key]["rmse_f"] for r in rows], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("CH4 training frames")
    ax.set_ylabel("force RMSE on valid (eV/A)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sample_efficiency.png", dpi=100)
    print(f"# wrote {out / 'sample_efficiency.json'} and {out / 'sample_efficiency.png'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
