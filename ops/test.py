"""Test: errors of a model on one downstream system (its valid and test splits).

With a pretrained model as well, also the zero-shot errors: the pretrained model with only its
per-element energy bias re-fitted on the system's training data (lamflow.model.finetune.zero_shot),
so the report can show how much fine-tuning gained.
"""

from __future__ import annotations

import json
from pathlib import Path

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .common import dataset_fmt, pick_root, set_threads, split_paths, trace, user_errors_are_fatal, write_json


def run_test(data: Path, system: str, model: Path, out_dir: Path, *, cleaned: Path | None = None,
             pretrained: Path | None = None, branch: str | None = None, device: str = "auto", log=print) -> dict:
    """Evaluate `model` (a checkpoint file or a folder holding model.ckpt) on the system; write
    metrics.json, parity.png (and zero_shot/...) into out_dir; return the summary. `device`:
    "auto" evaluates on the pod's GPU when it has one."""
    from lamflow.model.checkpoint import load_model
    from lamflow.model.data import load_systems

    out = Path(out_dir)
    root = pick_root(system, data, cleaned)
    fmt = dataset_fmt(root, system)
    paths = split_paths(root, system, "valid") + split_paths(root, system, "test")
    if not paths:
        paths = split_paths(root, system, "train")
    net = load_model(_ckpt(model), device)
    systems = load_systems(paths, list(net.type_map), fmt)
    res = _evaluate_finite(net, systems, out, f"test {system}", f"{system}: model")
    summary = {"system": system, "model": _headline(res["overall"]), "nframes": res["overall"]["nframes"]}
    if pretrained is not None:
        summary["zero_shot"] = _zero_shot(pretrained, root, system, fmt, systems, out / "zero_shot", branch, device, log)
    write_json(out / "summary.json", summary)
    for line in summary_table(summary):
        log(line)
    return summary


UNITS = {"rmse_e_per_atom": "E rmse meV/atom", "mae_e_per_atom": "E mae meV/atom", "rmse_f": "F rmse meV/A",
         "mae_f": "F mae meV/A", "rmse_v_per_atom": "V rmse meV/atom"}


def summary_table(summary: dict) -> list[str]:
    """The summary as a few aligned lines: one row per model entry (model, zero_shot, ...), errors in meV."""
    rows = {k.replace("_", "-"): v for k, v in summary.items() if isinstance(v, dict) and v}
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
    from lamflow.model.checkpoint import resolve_device
    from lamflow.model.data import load_systems
    from lamflow.model.finetune import zero_shot

    train = load_systems(split_paths(root, system, "train"), _type_map(pretrained), fmt)
    net = zero_shot(_ckpt(pretrained), train, branch=branch).to(resolve_device(device))
    res = _evaluate_finite(net, systems, out, f"test {system} (zero-shot)", f"{system}: zero-shot")
    return _headline(res["overall"])


def _evaluate_finite(net, systems, out: Path, source: str, label: str) -> dict:
    """evaluate_systems, but NaN/inf errors are refused (naming system and frame) before anything
    is written; suspicious labels get one warning line."""
    from lamflow.model.data_warnings import refuse_non_finite, warn_suspicious
    from lamflow.model.evaluate import collect, parity_plot, predict_systems

    warn_suspicious(systems, source)
    per = predict_systems(net, systems)
    res = collect(per)
    refuse_non_finite(res, per, source)
    out.mkdir(parents=True, exist_ok=True)  # as evaluate_systems writes them
    write_json(out / "metrics.json", res)
    parity_plot(per, out / "parity.png", label)
    return res


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
            "device": Parameter(str, default="auto"),       # auto: the pod's GPU when it has one, else CPU
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "model": Artifact(Path),                        # folder with model.ckpt (fine-tuned, or pretrained)
            "pretrained": Artifact(Path, optional=True),    # for the zero-shot comparison
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "report": Artifact(Path),                       # folder: metrics.json, parity.png, zero_shot/, summary.json
            "summary": Parameter(dict),                     # RMSEs of the model (and zero-shot) on the system
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("test", ip["system"])
        set_threads(ip["threads"])
        out = Path(f"test-{ip['system']}")
        with user_errors_are_fatal():
            summary = run_test(ip["data"], ip["system"], ip["model"], out, cleaned=ip["cleaned"],
                               pretrained=ip["pretrained"], branch=ip["branch"] or None, device=ip["device"])
        return OPIO({"report": out, "summary": json.loads(json.dumps(summary))})
