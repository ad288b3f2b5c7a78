"""Report: the pipeline's last artifact. One Markdown file with PNGs beside it, gathering every
stage's key figures (data kept/dropped by cleaning, pretraining curves per branch, zero-shot vs
fine-tuned errors per system, student vs teacher, compression error and speed-up), and
summary.json with the same numbers (what `lamflow status` shows per stage).

Each stage's output folder holds a summary.json (written by its OP); this module only reads
those and the PNGs next to them, through lamflow.model.tasks.report's Markdown helpers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import has_model
from .common import set_threads, trace, user_errors_are_fatal, write_json


def _load(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    f = Path(folder) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _png(src: Path, out: Path, name: str) -> Path | None:
    """Copy a PNG next to the report (so the downloaded folder renders by itself)."""
    if src.is_file():
        shutil.copy2(src, out / name)
        return out / name
    return None


def student_test(out_dir: Path, *, data: Path | None, dataset: str, student: Path | None, cleaned: Path | None = None,
                 transfer: dict | None = None, device: str = "auto", log=print) -> Path | None:
    """The student's transfer test (the test stage's run_test, role "student") on the distill
    dataset; it runs here because the student exists only after the test fan-out. Returns its folder."""
    from .test import run_test

    if data is None or student is None or not dataset or not has_model(student):
        return None
    folder = Path(out_dir) / "test-student"
    run_test(data, dataset, student, folder, cleaned=cleaned, transfer=transfer, role="student", device=device, log=log)
    return folder


def run_report(out_dir: Path, *, title: str, clean: Path | None = None, pretrain: Path | None = None,
               finetune: list[Path] | None = None, tests: list[Path] | None = None, distill: Path | None = None,
               compress: Path | None = None, student: Path | None = None) -> dict:
    """Write report.md, its PNGs and summary.json into out_dir; return the summary. `student`: the
    student's test folder (student_test's), shown with the fine-tuned models' tests."""
    from lamflow.model.tasks.report import (
        NOT_BETTER,
        Section,
        Table,
        bar_chart,
        baseline_table,
        compare_table,
        head_text,
        lambench_table,
        metrics_table,
        meV,
        ratio_text,
        verdicts,
        write_markdown,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    sections: list[Section] = []
    headline: list[list[str]] = []
    flags: list[str] = []

    c = _load(clean)
    if c is not None:
        summary["clean"] = c
        rows = [[n, d["kept"] + d["dropped"], d["kept"], d["dropped"],
                 ", ".join(f"{k} {v}" for k, v in d.get("by_reason", {}).items()) or "-"]
                for n, d in c["datasets"].items()]
        images = [p for n in c["datasets"] if (p := _png(Path(clean) / n / "clean.png", out, f"clean-{n}.png"))]
        sections.append(Section("Data cleaning", "Frames dropped because their labels or geometry cannot be right "
                                "(details per frame in each dataset's clean.json).",
                                [Table(["dataset", "frames", "kept", "dropped", "dropped by reason"], rows)], images))
        headline.append(["clean", f"kept {c['kept']} of {c['kept'] + c['dropped']} frames"])

    p = _load(pretrain)
    if p is not None:
        summary["pretrain"] = p
        rows = [[h, meV(m.get("rmse_e_per_atom")), meV(m.get("rmse_f"))] for h, m in p.get("heads", {}).items()
                if m.get("rmse_coord") is None]
        img = _png(Path(pretrain) / "lcurve.png", out, "pretrain-lcurve.png")
        # energy heads next to their dataset's composition-only baseline, on their validation frames
        heads = [{"system": h, "role": "pretrained head", "nframes": m.get("nframes", "-"), "normalised": m["normalised"]}
                 for h, m in p.get("heads", {}).items() if m.get("normalised")]
        pre_flags = [f for t in heads for f in verdicts(t)]
        flags += pre_flags
        text = (f"{p.get('kind', '')} model, {p.get('steps', '?')} steps; validation errors of each branch (head) at the end"
                + (", each next to the composition-only baseline of its dataset." if heads else "."))
        if heads:
            text += (" **Not better than its baseline:** " + "; ".join(pre_flags) + "." if pre_flags else
                     " Every energy head is better than its baseline.")
        plain = [Table(["branch", "E RMSE (meV/atom)", "F RMSE (meV/A)"], rows)] if rows else []
        tables = [baseline_table(heads)] if heads else plain
        summary["flags"] = flags
        denoise = [[h, f"{m['rmse_coord']:.4f}", "-" if m.get("acc_type") is None else f"{m['acc_type']:.3f}"]
                   for h, m in p.get("heads", {}).items() if m.get("rmse_coord") is not None]
        if denoise:  # label-free heads: how well they restore the displaced coordinates
            tables.append(Table(["denoise head", "coord RMSE (A)", "type accuracy"], denoise))
        sections.append(Section("Pretraining", text, tables, [img] if img else []))
        headline.append(["pretrain", "; ".join(head_text(h, m) for h, m in p.get("heads", {}).items())])

    ft = [(Path(f), s) for f in finetune or [] if (s := _load(f)) is not None]
    if ft:
        summary["finetune"] = {s["system"]: s for _, s in ft}
        rows = [[s["system"], s.get("steps", "-"), meV(s.get("metrics", {}).get("rmse_e_per_atom")),
                 meV(s.get("metrics", {}).get("rmse_f"))] for _, s in ft]
        images = [i for f, s in ft if (i := _png(f / "lcurve.png", out, f"finetune-{s['system']}-lcurve.png"))]
        sections.append(Section("Fine-tuning", "One fine-tuning run per downstream system, from the pretrained model.",
                                [Table(["system", "steps", "valid E RMSE (meV/atom)", "valid F RMSE (meV/A)"], rows)], images))
        headline.append(["finetune", "; ".join(f"{r[0]}: E {r[2]} meV/atom, F {r[3]} meV/A" for r in rows)])

    ts = [(Path(f), s) for f in tests or [] if (s := _load(f)) is not None]
    st_sum = _load(student)
    flags += [f for _, t in ts for f in t.get("flags", [])] + (st_sum or {}).get("flags", [])
    if ts or st_sum:
        everyone = [t for _, t in ts] + ([st_sum] if st_sum else [])
        text = ("Each error next to the composition-only baseline (LAMBench's dummy model); any result not better "
                "than its baseline, and any fine-tuned model worse than zero-shot, is named below. ")
        text += ("**Warnings:**\n\n" + "\n".join(f"- {f}" for f in flags)) if flags else \
            "Every model is better than its baseline on every reported error, and fine-tuning beats zero-shot."
        tables = [baseline_table(everyone)]
        if any(t.get("stability") or t.get("efficiency") for t in everyone):
            tables.append(lambench_table(everyone))
        images = []
        if st_sum:
            summary["student_test"] = st_sum
            images = [i for i in [_png(Path(student) / "parity.png", out, "test-student-parity.png")] if i]
        sections.append(Section("Against the baseline (LAMBench-style)", text, tables, images))
        summary["flags"] = flags
        headline.append(["baseline", (f"**{len(flags)} warning(s)**: " + "; ".join(flags)) if flags else
                         "every model better than its baseline; fine-tuning beats zero-shot"])
        for t in everyone:
            n = t.get("normalised", {})
            st = t.get("stability") or {}
            ef = t.get("efficiency") or {}
            headline.append([f"{t.get('role', 'model')} {t['system']}",
                             ", ".join(f"{k} ratio {ratio_text(n[key]['ratio'])}" for k, key in
                                       (("E", "rmse_e_per_atom"), ("F", "rmse_f"), ("V", "rmse_v_per_atom")) if key in n)
                             + (f"; NVE stable {st['stable']}/{st['total']}" if st else "")
                             + (f"; {ef['us_per_atom']:.1f} us/atom" if ef.get("us_per_atom") is not None else "")
                             + (f" ({NOT_BETTER})" if any(v.get("ratio") is not None and v["ratio"] >= 1 for v in n.values())
                                else "")])
    if ts:
        summary["test"] = {s["system"]: s for _, s in ts}
        tuned = {"systems": {s["system"]: {"nframes": s.get("nframes"), **s["model"]} for _, s in ts}}
        tables, images = [], []
        zs = {s["system"]: {"nframes": s.get("nframes"), **s["zero_shot"]} for _, s in ts if s.get("zero_shot")}
        if zs:
            zero = {"systems": zs}
            tables.append(compare_table(zero, tuned, ("zero-shot", "fine-tuned"),
                                        "zero-shot = the pretrained model with only its energy bias re-fitted on the system"))
            images.append(bar_chart({"zero-shot": zero, "fine-tuned": tuned}, out / "test-bars.png",
                                    title="zero-shot vs fine-tuned"))
        else:
            tables.append(metrics_table(tuned, "errors of the tested model"))
        images += [i for f, s in ts if (i := _png(f / "parity.png", out, f"test-{s['system']}-parity.png"))]
        splits = ", ".join(f"{s['system']}: {s.get('split', 'valid')}" for _, s in ts)
        sections.append(Section("Transferability tests", f"Errors on each system's held-out frames ({splits}).", tables, images))
        headline.append(["test", "; ".join(f"{s['system']}: F {meV(s['model'].get('rmse_f'))} meV/A"
                                           + (f" (zero-shot {meV(s['zero_shot'].get('rmse_f'))})" if s.get("zero_shot") else "")
                                           for _, s in ts)])

    d = _load(distill)
    if d is not None:
        summary["distill"] = d
        rows = [[who, meV(m.get("rmse_e_per_atom")), meV(m.get("rmse_f"))] for who, m in
                (("teacher vs DFT", d.get("teacher")), ("student vs DFT", d.get("student")),
                 ("student vs teacher (held out)", d.get("student_vs_teacher"))) if m]
        counts = d.get("counts", {})
        text = (f"The fine-tuned model of {d.get('dataset')} explored and labelled "
                f"{counts.get('train_frames', 0) + counts.get('test_frames', 0)} frames "
                f"(of {counts.get('sampled', '?')} sampled); the se_e2_a student has {d.get('student_params', '?')} parameters.")
        images = [i for png in sorted((Path(distill) / "plots").glob("*.png")) if (i := _png(png, out, f"distill-{png.name}"))]
        sections.append(Section("Distillation", text, [Table(["model", "E RMSE (meV/atom)", "F RMSE (meV/A)"], rows)], images))
        headline.append(["distill", f"student F {meV((d.get('student') or {}).get('rmse_f'))} meV/A vs teacher "
                                    f"{meV((d.get('teacher') or {}).get('rmse_f'))} meV/A"])

    k = _load(compress)
    if k is not None:
        summary["compress"] = k
        sp = k.get("speedup")
        rows = [["max abs dE (meV/atom)", meV(k.get("max_abs_de_per_atom"))], ["max abs dF (meV/A)", meV(k.get("max_abs_df"))],
                ["timed on (atoms)", k.get("natoms", "-")],
                ["original (s)", f"{k.get('seconds_model', 0):.4f}"], ["compressed (s)", f"{k.get('seconds_compressed', 0):.4f}"],
                ["speed-up", f"{sp:.2f}x" if sp else "-"]]
        words = ""
        if sp is not None and sp < 1.0:
            words = f" **The compressed model is slower than the original ({sp:.2f}x).**"
            flags.append(f"compression: the compressed model is slower than the original ({sp:.2f}x)")
        elif sp is not None and sp < 1.5:
            words = f" **Speed-up {sp:.2f}x is below the 1.5x compression should give.**"
            flags.append(f"compression: speed-up {sp:.2f}x is below 1.5x")
        sections.append(Section("Compression", f"Tabulated embedding nets ({k.get('tables')} tables, {k.get('rows')} rows); "
                                "largest deviation from the student, and wall time of one energy+force evaluation of a "
                                "cell grown from the data." + words,
                                [Table(["", "value"], rows)]))
        summary["flags"] = flags
        headline.append(["compress", f"max abs dF {meV(k.get('max_abs_df'))} meV/A, speed-up {f'{sp:.2f}x' if sp else '-'}"
                                     + (f" on {k['natoms']} atoms" if k.get("natoms") else "") + words])

    intro = Section("Summary", "", [Table(["stage", "result"], headline)]) if headline else None
    write_markdown(([intro] if intro else []) + sections, out / "report.md", title=title)
    write_json(out / "summary.json", summary)
    return summary


class Report(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "title": Parameter(str),
            "clean": Artifact(Path, optional=True),          # clean report folder (summary.json, <dataset>/clean.png)
            "pretrain": Artifact(Path, optional=True),       # pretrain output (summary.json, lcurve.png)
            "finetune": Artifact(List[Path], optional=True), # fine-tuned model folders, one per system
            "tests": Artifact(List[Path], optional=True),    # test reports, one per system
            "distill": Artifact(Path, optional=True),        # distill output (summary.json, plots/)
            "compress": Artifact(Path, optional=True),       # compress output (summary.json)
            "student": Artifact(Path, optional=True),        # distill output: the student is tested here (after distill)
            "data": Artifact(Path, optional=True),           # staged datasets, for the student's test
            "cleaned": Artifact(Path, optional=True),        # the clean stage's output, when it ran
            "student_dataset": Parameter(str, default=""),   # the distill dataset the student is tested on
            "transfer": Parameter(dict, default={}),         # the test stage's stability / efficiency settings
            "device": Parameter(str, default="auto"),        # the student's test: the pod's GPU when it has one
            "threads": Parameter(int, default=0),            # torch threads (0: torch's default)
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
        set_threads(ip["threads"])
        out = Path("report")
        with user_errors_are_fatal():
            student = student_test(Path("student-test"), data=ip["data"], dataset=ip["student_dataset"], student=ip["student"],
                                   cleaned=ip["cleaned"], transfer=ip["transfer"], device=ip["device"])
        summary = run_report(out, title=ip["title"], clean=ip["clean"], pretrain=ip["pretrain"], finetune=ip["finetune"],
                             tests=ip["tests"], distill=ip["distill"], compress=ip["compress"], student=student)
        return OPIO({"report": out, "summary": json.loads(json.dumps(summary))})
