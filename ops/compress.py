"""Compress: tabulate the student's se_e2_a embedding nets (lamflow.model.tasks.compress), check the
compressed model against the original on the dataset's frames, and time both."""

from __future__ import annotations

import json
from pathlib import Path

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import model_file
from .common import dataset_fmt, pick_root, set_threads, split_paths, trace, user_errors_are_fatal, write_json


def speedup(model, compressed, systems, natoms: int = 1000, repeats: int = 15) -> dict:
    """Wall time of one energy+force evaluation, original vs compressed, on the first structure of
    the first system replicated to >= natoms atoms, as a production MD runs it (best of `repeats`
    alternating calls, after a warm-up of both; on a shared neighbour list, and with the list
    built in each call: lamflow.model.tasks.lambench.speedup)."""
    from lamflow.model.tasks.lambench import speedup as grown_speedup

    return grown_speedup(model, compressed, systems[0], natoms, repeats)


def run_compress(config: dict, model: Path, data: Path, dataset: str, out_dir: Path, *, cleaned: Path | None = None,
                 device: str = "auto", log=print) -> dict:
    """Compress `model` (checkpoint or folder with model.ckpt) into out_dir/model.ckpt; summary.json
    holds the largest energy/force deviation and the measured speed-up (both measured on `device`:
    "auto" is the pod's GPU when it has one)."""
    from lamflow.model.data.systems import load_systems
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.tasks.compress import compress

    cfg = dict(config or {})
    known = {"stride", "extrapolate", "check_frequency", "min_nbor_dist"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        from lamflow.model.errors import ConfigError

        raise ConfigError(f"stages.compress.config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = model_file(model)
    root = pick_root(dataset, data, cleaned)
    fmt = dataset_fmt(root, dataset)
    paths = split_paths(root, dataset, "train")
    res = compress(src, model_file(out), training_data=paths, fmt=fmt, device=device, log=log, **cfg)
    net, comp = load_model(src, device), load_model(res.checkpoint, device)
    check = split_paths(root, dataset, "valid") or paths
    timing = speedup(net, comp, load_systems(check, list(net.type_map), fmt, labeled=False))
    summary = {"dataset": dataset, "min_nbor_dist": res.min_nbor_dist, "tables": res.tables, "rows": res.rows,
               **{k: res.check.get(k) for k in ("max_abs_de_per_atom", "max_abs_df", "frames")}, **timing}
    log(f"compress: speed-up {timing['speedup']:.2f}x ({timing['seconds_model']:.4f} s -> {timing['seconds_compressed']:.4f} s "
        f"on {timing['natoms']} atoms; {timing['speedup_with_nlist']:.2f}x with the neighbour list)")
    write_json(out / "summary.json", summary)
    return summary


class Compress(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "config": Parameter(dict),                      # stride, extrapolate, check_frequency, min_nbor_dist
            "dataset": Parameter(str),                      # frames for min_nbor_dist, the check and the timing
            "device": Parameter(str, default="auto"),       # check and timing: the pod's GPU when it has one
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "model": Artifact(Path),                        # folder with the student's model.ckpt
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "model": Artifact(Path),                        # folder: model.ckpt (compressed), summary.json
            "summary": Parameter(dict),                     # max |dE|, max |dF|, speed-up
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("compress")
        set_threads(ip["threads"])
        out = Path("compress")
        with user_errors_are_fatal():
            summary = run_compress(ip["config"], ip["model"], ip["data"], ip["dataset"], out, cleaned=ip["cleaned"],
                                   device=ip["device"])
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})
