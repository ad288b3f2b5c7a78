"""Clean: drop frames whose labels or geometry cannot be right (lamflow.model.tasks.clean), per dataset.

Each dataset's splits are cleaned together (one energy fit per input path) and written back in
the staged layout (ops.common), as deepmd/npy, so later stages read the cleaned copy instead of
the raw one. A split whose frames were all dropped is left out.

The fan-out steps (one fine-tune / test pod per system) read a second output, `systems`, laid
out as the raw per-system inputs are (`<fanout>/<i>/<dataset>/...`, plus `<fanout>/<i>/system.json`
so that every item exists even when its dataset was not cleaned). The DAG hands pod i only the
sub-path `<fanout>/<i>` of it, so a pod downloads its own system's cleaned data and nothing else.
`systems` is stored unarchived: a sub-path of a tarred artifact cannot be fetched alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import model_file
from .common import SPLITS, dataset_fmt, set_threads, split_paths, trace, user_errors_are_fatal, write_json

SYSTEMS_DIR = "cleaned-systems"  # the folder the OP writes `systems` into: the artifact holds it by this name


def run_clean(data: Path, datasets: list[str], out_dir: Path, report_dir: Path, *, config: dict | None = None,
              type_map: list[str] | None = None, pretrained: Path | None = None, fanout: dict | None = None,
              systems_dir: Path | None = None, log=print) -> dict:
    """Clean each dataset of the staged `data` into out_dir (same layout); write each dataset's
    clean.json / clean.png / report.md under report_dir/<dataset>/ and report_dir/summary.json.
    `fanout` ({"finetune": [dataset, ...]}, by item index) with `systems_dir`: also write each
    fan-out item's cleaned dataset under systems_dir/<fanout>/<i>/ (module docstring)."""
    from lamflow.model.schema import parse_config
    from lamflow.model.tasks.clean import CleanConfig, clean

    cfg = parse_config(CleanConfig, config or {}, "stages.clean.config")
    out, rep = Path(out_dir), Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep.mkdir(parents=True, exist_ok=True)
    ckpt = model_file(pretrained) if pretrained is not None else None
    summary = {"datasets": {}, "kept": 0, "dropped": 0}
    for name in datasets:
        fmt = dataset_fmt(data, name)
        paths = {s: split_paths(data, name, s) for s in SPLITS}
        inputs = [p for s in SPLITS for p in paths[s]]
        res = clean(inputs, rep / name, cfg, type_map=type_map, pretrained=str(ckpt) if ckpt else None, fmt=fmt, log=log)
        splits = {}
        for s in SPLITS:
            n = 0
            for p in paths[s]:
                outs = [rep / name / r["out"] for r in res.report["systems"]
                        if r["out"] and (r["source"] == p or r["source"].startswith(p + "/"))]
                if not outs:
                    continue
                dst = out / name / s / str(n)
                for o in outs:  # one input path may hold several systems
                    shutil.copytree(o, dst / o.relative_to(rep / name / "data"))
                n += 1
            if n:
                splits[s] = n
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "dataset.json").write_text(json.dumps({"fmt": "auto", "splits": splits}))
        shutil.rmtree(rep / name / "data", ignore_errors=True)  # the data live in the cleaned artifact
        by_reason = {k: v for k, v in res.report["counts_by_reason"].items() if v}
        summary["datasets"][name] = {"kept": res.kept, "dropped": res.dropped, "by_reason": by_reason}
        summary["kept"] += res.kept
        summary["dropped"] += res.dropped
    write_json(rep / "summary.json", summary)
    if systems_dir is not None:
        write_fanout_systems(out, Path(systems_dir), fanout or {})
    return summary


def write_fanout_systems(cleaned: Path, systems_dir: Path, fanout: dict) -> Path:
    """systems_dir/<fanout>/<i>/system.json ({"dataset", "cleaned"}) and, when the dataset was
    cleaned, systems_dir/<fanout>/<i>/<dataset>/ (hard links into `cleaned` where possible);
    systems_dir/fanout.json names them all (and keeps an unarchived artifact from being empty)."""
    systems_dir.mkdir(parents=True, exist_ok=True)
    write_json(systems_dir / "fanout.json", fanout)
    for kind, names in fanout.items():
        for i, name in enumerate(names):
            item = systems_dir / kind / str(i)
            shutil.rmtree(item, ignore_errors=True)
            item.mkdir(parents=True)
            done = (cleaned / name / "dataset.json").is_file()
            if done:
                shutil.copytree(cleaned / name, item / name, copy_function=_link_or_copy)
            write_json(item / "system.json", {"dataset": name, "cleaned": done})
    return systems_dir


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Clean(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "datasets": Parameter(List[str]),               # the datasets to clean (others pass through untouched)
            "config": Parameter(dict),                      # lamflow.model.tasks.clean.CleanConfig keys
            "type_map": Parameter(List[str]),               # the pipeline's elements
            "data": Artifact(Path),                         # staged datasets (ops.common layout)
            "pretrained": Artifact(Path, optional=True),    # checkpoint for element coverage and zero-shot errors
            "fanout": Parameter(dict, default={}),          # {"finetune" | "test": [dataset of item i, ...]}
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "cleaned": Artifact(Path),                      # cleaned datasets, same layout, deepmd/npy
            "systems": Artifact(Path, archive=None),        # <fanout>/<i>/: item i's cleaned dataset (unarchived)
            "report": Artifact(Path),                       # per dataset: clean.json, clean.png, report.md; summary.json
            "summary": Parameter(dict),                     # frames kept / dropped per dataset
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("clean")
        set_threads(ip["threads"])
        out, rep, systems = Path("cleaned"), Path("clean-report"), Path(SYSTEMS_DIR)
        with user_errors_are_fatal():
            summary = run_clean(ip["data"], list(ip["datasets"]), out, rep, config=ip["config"],
                                type_map=list(ip["type_map"]), pretrained=ip["pretrained"], fanout=ip["fanout"],
                                systems_dir=systems)
        return OPIO({"cleaned": out, "report": rep, "systems": systems, "summary": json.loads(json.dumps(summary))})
