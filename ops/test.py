"""Test: errors of a model on one downstream system (its valid and test splits).

With a pretrained model as well, also the zero-shot errors: the pretrained model with only its
per-element energy bias re-fitted on the system's training data (lamflow.model.finetune.zero_shot),
so the report can show how much fine-tuning gained.

Every error stands next to the composition-only baseline (lamflow.model.baseline, fitted on the
system's training frames), as LAMBench normalises; `transfer` settings add LAMBench's NVE
stability and efficiency (lamflow.model.lambench). The test frames are the `test` split when the
dataset has one (held out from every decision), else `valid`, else `train`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .common import dataset_fmt, pick_root, set_threads, split_paths, trace, user_errors_are_fatal, write_json


def test_split(root: Path, system: str) -> tuple[str, list[str]]:
    """The held-out `test` split when the dataset has one, else `valid`, else `train`."""
    for split in ("test", "valid", "train"):
        paths = split_paths(root, system, split)
        if paths:
            return split, paths
    return "train", []


def run_test(data: Path, system: str, model: Path, out_dir: Path, *, cleaned: Path | None = None,
             pretrained: Path | None = None, branch: str | None = None, transfer: dict | None = None,
             role: str = "fine-tuned", log=print) -> dict:
    """Evaluate `model` (a checkpoint file or a folder holding model.ckpt) on the system; write
    metrics.json, baseline.json, parity.png (and zero_shot/...) into out_dir; return the summary.
    `transfer`: lamflow.model.lambench settings ({"stability": {...}, "efficiency": {...}}; a
    section given as false is skipped). `role` names the model in the report ("fine-tuned", "student")."""
    from lamflow.model.baseline import baseline_errors, fit_baseline, normalised
    from lamflow.model.checkpoint import load_model
    from lamflow.model.data import load_systems
    from lamflow.model.evaluate import evaluate_systems
    from lamflow.model.report import short_names, verdicts

    out = Path(out_dir)
    root = pick_root(system, data, cleaned)
    fmt = dataset_fmt(root, system)
    split, paths = test_split(root, system)
    net = load_model(_ckpt(model))
    tm = list(net.type_map)
    systems = load_systems(paths, tm, fmt)
    train = load_systems(split_paths(root, system, "train"), tm, fmt) if split != "train" else systems
    res = evaluate_systems(net, systems, out, label=f"{split} split: {role} model vs DFT", dataset=system)
    base = baseline_errors(fit_baseline(train, len(tm)), systems)
    write_json(out / "baseline.json", base)
    short = short_names(list(res["systems"]))
    summary = {"system": system, "role": role, "split": split, "model": _headline(res["overall"]),
               "baseline": _headline(base["overall"]), "normalised": normalised(res["overall"], base["overall"]),
               "nframes": res["overall"]["nframes"],
               "systems": {short[n]: {"nframes": m["nframes"], "model": _headline(m), "baseline": _headline(base["systems"][n]),
                                      "normalised": normalised(m, base["systems"][n])} for n, m in res["systems"].items()}}
    if pretrained is not None:
        zs = _zero_shot(pretrained, root, system, fmt, systems, out / "zero_shot", branch, log)
        summary["zero_shot"] = _headline(zs["overall"])
        summary["zero_shot_normalised"] = normalised(zs["overall"], base["overall"])
        for n, m in zs["systems"].items():
            if short.get(n) in summary["systems"]:
                summary["systems"][short[n]]["zero_shot"] = _headline(m)
    summary.update(_transfer(net, systems, transfer, log))
    summary["flags"] = verdicts(summary)
    write_json(out / "summary.json", summary)
    log(f"test {system} ({split}, {summary['nframes']} frames): " + _line(summary))
    for flag in summary["flags"]:
        log(f"  warning: {flag}")
    return summary


def _transfer(net, systems, transfer: dict | None, log) -> dict:
    """LAMBench's stability (NVE drift) and efficiency (us/atom) of the model."""
    from lamflow.model.lambench import efficiency, stability

    out = {}
    cfg = dict(transfer or {})
    if cfg.get("stability") not in (None, False):
        out["stability"] = stability(net, systems, log=log, **dict(cfg["stability"] or {}))
    if cfg.get("efficiency") not in (None, False):
        out["efficiency"] = efficiency(net, systems, **dict(cfg["efficiency"] or {}))
    return out


def _line(s: dict) -> str:
    """One readable line: E/F RMSE with the baseline ratio (and zero-shot), stability, efficiency."""
    parts = []
    for key, name, unit in (("rmse_e_per_atom", "E", "meV/atom"), ("rmse_f", "F", "meV/A")):
        n = s.get("normalised", {}).get(key)
        if n:
            z = (s.get("zero_shot") or {}).get(key)
            parts.append(f"{name} {1000 * n['model']:.2f} {unit} ({n['ratio']:.2f}x baseline"
                         + (f", zero-shot {1000 * z:.2f}" if z is not None else "") + ")")
    st, ef = s.get("stability"), s.get("efficiency")
    if st:
        parts.append(f"NVE stable {st['stable']}/{st['total']}")
    if ef and ef.get("us_per_atom") is not None:
        parts.append(f"{ef['us_per_atom']:.1f} us/atom at {ef['natoms']} atoms")
    return "; ".join(parts)


def _zero_shot(pretrained: Path, root: Path, system: str, fmt: str, systems, out: Path, branch, log) -> dict:
    from lamflow.model.data import load_systems
    from lamflow.model.evaluate import evaluate_systems
    from lamflow.model.finetune import zero_shot

    train = load_systems(split_paths(root, system, "train"), _type_map(pretrained), fmt)
    net = zero_shot(_ckpt(pretrained), train, branch=branch)
    return evaluate_systems(net, systems, out, label=f"{system}: zero-shot (pretrained, energy bias refit) vs DFT",
                            dataset=system)


def _type_map(ckpt: Path) -> list[str]:
    from lamflow.model.checkpoint import read_checkpoint

    return list(read_checkpoint(_ckpt(ckpt))["type_map"])


def _ckpt(p: Path) -> Path:
    p = Path(p)
    return p / "model.ckpt" if p.is_dir() else p


def _headline(m: dict) -> dict:
    keys = ("rmse_e_per_atom", "mae_e_per_atom", "rmse_f", "mae_f", "rmse_v_per_atom")
    return {k: m[k] for k in keys if m.get(k) is not None}


class Test(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "system": Parameter(str),                       # the dataset to test on
            "branch": Parameter(str, default=""),           # pretrained head for the zero-shot test
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "model": Artifact(Path),                        # folder with model.ckpt (fine-tuned, or pretrained)
            "pretrained": Artifact(Path, optional=True),    # for the zero-shot comparison
            "transfer": Parameter(dict, default={}),        # lamflow.model.lambench settings: stability, efficiency
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "report": Artifact(Path),                       # folder: metrics.json, baseline.json, parity.png, zero_shot/, summary.json
            "summary": Parameter(dict),                     # RMSEs, baseline ratios (and zero-shot), stability, efficiency
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("test", ip["system"])
        set_threads()
        out = Path(f"test-{ip['system']}")
        with user_errors_are_fatal():
            summary = run_test(ip["data"], ip["system"], ip["model"], out, cleaned=ip["cleaned"],
                               pretrained=ip["pretrained"], branch=ip["branch"] or None, transfer=ip["transfer"])
        return OPIO({"report": out, "summary": json.loads(json.dumps(summary))})
