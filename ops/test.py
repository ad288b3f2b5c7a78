"""Test: errors of a model on one downstream system (its valid and test splits).

With a pretrained model as well, also the zero-shot errors: the pretrained model with only its
per-element energy bias re-fitted on the system's training data (lamflow.model.training.pretrained.zero_shot),
so the report can show how much fine-tuning gained.

Every error stands next to the composition-only baseline (lamflow.model.tasks.baseline, fitted on the
system's training frames), as LAMBench normalises; `transfer` settings add LAMBench's NVE
stability and efficiency (lamflow.model.tasks.lambench). The test frames are the `test` split when the
dataset has one (held out from every decision), else `valid`, else `train`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import model_file
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
             role: str = "fine-tuned", device: str = "auto", log=print) -> dict:
    """Evaluate `model` (a checkpoint file or a folder holding model.ckpt) on the system; write
    metrics.json, baseline.json, parity.png (and zero_shot/...) into out_dir; return the summary.
    `transfer`: lamflow.model.tasks.lambench settings ({"stability": {...}, "efficiency": {...}}; a
    section given as false is skipped). `role` names the model in the report ("fine-tuned", "student").
    `device`: "auto" evaluates on the pod's GPU when it has one."""
    from lamflow.model.data.systems import load_systems
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.tasks.baseline import baseline_errors, fit_baseline, normalised
    from lamflow.model.tasks.report import short_names, verdicts

    out = Path(out_dir)
    root = pick_root(system, data, cleaned)
    fmt = dataset_fmt(root, system)
    split, paths = test_split(root, system)
    net = load_model(model_file(model), device)
    tm = list(net.type_map)
    systems = load_systems(paths, tm, fmt)
    train_paths = split_paths(root, system, "train") if split != "train" else []
    # the baseline is fitted on the training split; without one, on the tested frames (strict on the model)
    train = load_systems(train_paths, tm, fmt) if train_paths else systems
    res = _evaluate_finite(net, systems, out, f"test {system}", f"{split} split: {role} model vs DFT", system)
    base = baseline_errors(fit_baseline(train, len(tm)), systems)
    write_json(out / "baseline.json", base)
    short = short_names(list(res["systems"]))
    summary = {"system": system, "role": role, "split": split, "model": _headline(res["overall"]),
               "baseline": _headline(base["overall"]), "normalised": normalised(res["overall"], base["overall"]),
               "nframes": res["overall"]["nframes"],
               "systems": {short[n]: {"nframes": m["nframes"], "model": _headline(m), "baseline": _headline(base["systems"][n]),
                                      "normalised": normalised(m, base["systems"][n])} for n, m in res["systems"].items()}}
    if pretrained is not None:
        zs = _zero_shot(pretrained, root, system, fmt, systems, out / "zero_shot", branch, device, log)
        summary["zero_shot"] = _headline(zs["overall"])
        summary["zero_shot_normalised"] = normalised(zs["overall"], base["overall"])
        for n, m in zs["systems"].items():
            if short.get(n) in summary["systems"]:
                summary["systems"][short[n]]["zero_shot"] = _headline(m)
    summary.update(_transfer(net, systems, transfer, log))
    summary["flags"] = verdicts(summary)
    write_json(out / "summary.json", summary)
    log(f"test {system} ({split}, {summary['nframes']} frames): " + _line(summary))
    for line in summary_table(summary)[1:]:
        log(line)
    for flag in summary["flags"]:
        log(f"  warning: {flag}")
    return summary


def _transfer(net, systems, transfer: dict | None, log) -> dict:
    """LAMBench's stability (NVE drift) and efficiency (us/atom) of the model."""
    from lamflow.model.tasks.lambench import efficiency, stability

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


UNITS = {"rmse_e_per_atom": "E rmse meV/atom", "mae_e_per_atom": "E mae meV/atom", "rmse_f": "F rmse meV/A",
         "mae_f": "F mae meV/A", "rmse_v_per_atom": "V rmse meV/atom"}


def summary_table(summary: dict) -> list[str]:
    """The summary as a few aligned lines: one row per model entry (model, zero_shot, ...), errors in meV."""
    rows = {k.replace("_", "-"): v for k, v in summary.items() if k in ("model", "baseline", "zero_shot") and v}
    cols = [k for k in UNITS if any(k in r for r in rows.values())]
    cols += sorted({k for r in rows.values() for k, v in r.items() if k not in UNITS and isinstance(v, (int, float))})
    table = [["", *[UNITS.get(c, c) for c in cols]]]
    for name, r in rows.items():
        table.append([name, *[_cell(c, r.get(c)) for c in cols]])
    w = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    head = f"test {summary.get('system', '?')}: {summary.get('nframes', '?')} frames"
    return [head] + ["  " + "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(t)) for t in table]


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if key in UNITS:
        return f"{1000 * v:.2f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _zero_shot(pretrained: Path, root: Path, system: str, fmt: str, systems, out: Path, branch, device, log) -> dict:
    from lamflow.model.data.systems import load_systems
    from lamflow.model.io.checkpoint import resolve_device
    from lamflow.model.training.pretrained import zero_shot

    train = load_systems(split_paths(root, system, "train"), _type_map(pretrained), fmt)
    net = zero_shot(model_file(pretrained), train, branch=branch).to(resolve_device(device))
    return _evaluate_finite(net, systems, out, f"test {system} (zero-shot)",
                            f"{system}: zero-shot (pretrained, energy bias refit) vs DFT", system)


def _evaluate_finite(net, systems, out: Path, source: str, label: str, dataset: str = "") -> dict:
    """evaluate_systems, but NaN/inf errors are refused (naming system and frame) before anything
    is written; suspicious labels get one warning line."""
    from lamflow.model.tasks.evaluate import parity_plot
    from lamflow.model.training.data_warnings import refuse_non_finite, warn_suspicious
    from lamflow.model.training.metrics import collect, predict_systems

    warn_suspicious(systems, source)
    per = predict_systems(net, systems)
    res = collect(per)
    refuse_non_finite(res, per, source)
    out.mkdir(parents=True, exist_ok=True)  # as evaluate_systems writes them
    write_json(out / "metrics.json", res)
    parity_plot(per, out / "parity.png", label, dataset=dataset)
    return res


def _type_map(ckpt: Path) -> list[str]:
    from lamflow.model.io.checkpoint import read_checkpoint

    return list(read_checkpoint(model_file(ckpt))["type_map"])


def _headline(m: dict) -> dict:
    keys = ("rmse_e_per_atom", "mae_e_per_atom", "rmse_f", "mae_f", "rmse_v_per_atom")
    return {k: m[k] for k in keys if m.get(k) is not None}


class Test(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "system": Parameter(str),                       # the dataset to test on
            "branch": Parameter(str, default=""),           # pretrained head for the zero-shot test
            "device": Parameter(str, default="auto"),       # auto: the pod's GPU when it has one, else CPU
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "model": Artifact(Path),                        # folder with model.ckpt (fine-tuned, or pretrained)
            "pretrained": Artifact(Path, optional=True),    # for the zero-shot comparison
            "transfer": Parameter(dict, default={}),        # lamflow.model.tasks.lambench settings: stability, efficiency
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "report": Artifact(Path),                       # metrics.json, baseline.json, parity.png, zero_shot/, summary.json
            "summary": Parameter(dict),                     # RMSEs, baseline ratios (and zero-shot), stability, efficiency
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("test", ip["system"])
        set_threads(ip["threads"])
        out = Path(f"test-{ip['system']}")
        with user_errors_are_fatal():
            summary = run_test(ip["data"], ip["system"], ip["model"], out, cleaned=ip["cleaned"],
                               pretrained=ip["pretrained"], branch=ip["branch"] or None, transfer=ip["transfer"],
                               device=ip["device"])
        return OPIO({"report": out, "summary": json.loads(json.dumps(summary))})
