"""Report: the pipeline's last artifact. One Markdown file with PNGs beside it, gathering every
stage's key figures (data kept/dropped by cleaning, pretraining curves, zero-shot vs fine-tuned
errors per system, student vs teacher, compression error and speed-up), plus summary.json with
the same numbers for `lamflow status`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .common import trace, write_json


def _load(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    f = Path(folder) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _copy_png(src: Path, out: Path, name: str) -> str | None:
    if src.is_file():
        shutil.copy2(src, out / name)
        return name
    return None


def _meV(v) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_report(out_dir: Path, *, title: str, clean: Path | None = None, pretrain: Path | None = None,
               finetune: list[Path] | None = None, tests: list[Path] | None = None, distill: Path | None = None,
               compress: Path | None = None) -> dict:
    """Write report.md, its PNGs and summary.json into out_dir; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    parts = [f"# {title}", ""]

    c = _load(clean)
    if c is not None:
        summary["clean"] = c
        rows = [[name, str(d.get("kept", "-")), str(d.get("dropped", "-"))] for name, d in c.get("datasets", {}).items()]
        parts += ["## Data cleaning", "", _table(["dataset", "frames kept", "frames dropped"], rows), ""]

    p = _load(pretrain)
    if p is not None:
        summary["pretrain"] = p
        rows = [[h, _meV(m.get("rmse_e_per_atom")), _meV(m.get("rmse_f"))] for h, m in p.get("heads", {}).items()]
        parts += ["## Pretraining", "", f"{p.get('kind', '')} model, {p.get('steps', '?')} steps.", "",
                  _table(["head", "valid E RMSE (meV/atom)", "valid F RMSE (meV/A)"], rows), ""]
        png = _copy_png(Path(pretrain) / "lcurve.png", out, "pretrain-lcurve.png")
        if png:
            parts += [f"![pretraining learning curve]({png})", ""]

    ft = [s for s in (_load(f) for f in finetune or []) if s is not None]
    if ft:
        summary["finetune"] = {s["system"]: s for s in ft}
    ts = [(Path(f), s) for f in tests or [] if (s := _load(f)) is not None]
    if ts:
        summary["test"] = {s["system"]: s for _, s in ts}
        rows = []
        for _, s in ts:
            z, m = s.get("zero_shot", {}), s.get("model", {})
            rows.append([s["system"], str(s.get("nframes", "-")), _meV(z.get("rmse_e_per_atom")), _meV(m.get("rmse_e_per_atom")),
                         _meV(z.get("rmse_f")), _meV(m.get("rmse_f"))])
        parts += ["## Fine-tuning and transferability", "",
                  "Errors on each system's validation (and test) frames: zero-shot = the pretrained model with only its "
                  "energy bias re-fitted; fine-tuned = after the fine-tuning stage.", "",
                  _table(["system", "frames", "E zero-shot (meV/atom)", "E fine-tuned (meV/atom)", "F zero-shot (meV/A)",
                          "F fine-tuned (meV/A)"], rows), ""]
        for folder, s in ts:
            png = _copy_png(folder / "parity.png", out, f"test-{s['system']}-parity.png")
            if png:
                parts += [f"![{s['system']} parity]({png})", ""]

    d = _load(distill)
    if d is not None:
        summary["distill"] = d
        rows = [[who, _meV(m.get("rmse_e_per_atom")), _meV(m.get("rmse_f"))]
                for who, m in (("teacher", d.get("teacher", {})), ("student", d.get("student", {})))]
        parts += ["## Distillation", "", _table(["model", "E RMSE (meV/atom)", "F RMSE (meV/A)"], rows), ""]

    k = _load(compress)
    if k is not None:
        summary["compress"] = k
        parts += ["## Compression", "", _table(["max |dE| (meV/atom)", "max |dF| (meV/A)", "speed-up"],
                                                [[_meV(k.get("max_abs_de_per_atom")), _meV(k.get("max_abs_df")),
                                                  f"{k['speedup']:.2f}x" if k.get("speedup") else "-"]]), ""]

    (out / "report.md").write_text("\n".join(parts))
    write_json(out / "summary.json", summary)
    return summary


class Report(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "title": Parameter(str),
            "clean": Artifact(Path, optional=True),          # clean stage output (summary.json)
            "pretrain": Artifact(Path, optional=True),       # pretrain output (summary.json, lcurve.png)
            "finetune": Artifact(List[Path], optional=True), # fine-tuned model folders
            "tests": Artifact(List[Path], optional=True),    # test reports, one per system
            "distill": Artifact(Path, optional=True),
            "compress": Artifact(Path, optional=True),
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "report": Artifact(Path),                        # report.md + PNGs + summary.json
            "summary": Parameter(dict),
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("report")
        out = Path("report")
        summary = run_report(out, title=ip["title"], clean=ip["clean"], pretrain=ip["pretrain"], finetune=ip["finetune"],
                             tests=ip["tests"], distill=ip["distill"], compress=ip["compress"])
        return OPIO({"report": out, "summary": json.loads(json.dumps(summary))})
