"""Human-readable reports: Markdown sections of text, tables and plots (embedded by paths relative
to the report, so a downloaded folder renders as is), bar charts across systems, and one report
gathered from the output folders of a run's stages.

    sections = [Section("Test", "ch4 after fine-tuning", tables=[metrics_table(m)], images=["parity.png"])]
    write_markdown(sections, out / "report.md", title="lamflow test")

Energies and virials are shown in meV/atom, forces in meV/A, two decimals.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lamflow.model.io.files import atomic_write_text

# metric key in metrics.json -> column title
METRICS = {
    "rmse_e_per_atom": "E RMSE (meV/atom)",
    "mae_e_per_atom": "E MAE (meV/atom)",
    "rmse_f": "F RMSE (meV/A)",
    "mae_f": "F MAE (meV/A)",
    "rmse_v_per_atom": "V RMSE (meV/atom)",
    "mae_v_per_atom": "V MAE (meV/atom)",
}


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    caption: str = ""

    def markdown(self) -> str:
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(cell(h) for h in self.header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in self.rows]
        return (f"*{self.caption}*\n\n" if self.caption else "") + "\n".join(lines)


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[str | os.PathLike] = field(default_factory=list)  # PNG paths (absolute or relative to cwd)
    level: int = 2  # Markdown heading level


def meV(v) -> str:
    """eV -> meV with two decimals; '-' when missing."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{1000 * v:.2f}"


def short_names(names: list[str]) -> dict[str, str]:
    """System paths without their common parent folders (a lone path keeps its last two parts)."""
    parts = [Path(n).parts for n in names]
    if len(parts) == 1:
        k = max(0, len(parts[0]) - 2)
    else:
        k = 0
        while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
            k += 1
    return {n: "/".join(p[k:]) for n, p in zip(names, parts)}


def _columns(rows: list[dict], keys) -> list[str]:
    keys = list(METRICS) if keys is None else list(keys)
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def metrics_table(metrics: dict, caption: str = "", keys=None) -> Table:
    """{"systems": {name: m}, "overall": m} (evaluate_systems' result) -> one row per system + overall."""
    systems = metrics.get("systems", {})
    rows = list(systems.values()) + [metrics.get("overall", {})]
    cols = _columns(rows, keys)
    names = short_names(list(systems))
    body = [[names[n], m.get("nframes", "-")] + [meV(m.get(k)) for k in cols] for n, m in systems.items()]
    if metrics.get("overall"):
        o = metrics["overall"]
        body.append(["**overall**", o.get("nframes", "-")] + [meV(o.get(k)) for k in cols])
    return Table(["system", "frames"] + [METRICS.get(k, k) for k in cols], body, caption)


def compare_table(first: dict, second: dict, labels: tuple[str, str] = ("zero-shot", "fine-tuned"),
                  caption: str = "", keys=("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom")) -> Table:
    """Two models' metrics side by side for the systems both were tested on, plus overall."""
    names = [n for n in second.get("systems", {}) if n in first.get("systems", {})]
    pairs = [(n, first["systems"][n], second["systems"][n]) for n in names]
    if first.get("overall") and second.get("overall"):
        pairs.append(("**overall**", first["overall"], second["overall"]))
    cols = [k for k in keys if any(a.get(k) is not None and b.get(k) is not None for _, a, b in pairs)]
    short = short_names(names)
    header = ["system", "frames"]
    for k in cols:
        header += [f"{METRICS.get(k, k)} {labels[0]}", f"{METRICS.get(k, k)} {labels[1]}"]
    body = []
    for n, a, b in pairs:
        row = [short.get(n, n), b.get("nframes", "-")]
        for k in cols:
            row += [meV(a.get(k)), meV(b.get(k))]
        body.append(row)
    return Table(header, body, caption)


# ----------------------------------------------------------------------------- baselines, in words

NAMES = {"rmse_e_per_atom": ("E", "meV/atom"), "rmse_f": ("F", "meV/A"), "rmse_v_per_atom": ("V", "meV/atom")}
NOT_BETTER = "not better than baseline"  # the words the report uses; tests look for them


def ratio_text(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def head_text(name: str, m: dict) -> str:
    """One pretraining head's validation errors in a few words: E and F (with the baseline ratio
    when the head has one) for an energy head, the coordinate RMSE (and type accuracy) for a
    denoise head."""
    if m.get("rmse_coord") is not None:
        acc = f", type accuracy {m['acc_type']:.2f}" if m.get("acc_type") is not None else ""
        return f"{name}: denoise coord RMSE {m['rmse_coord']:.3f} A{acc}"
    norm = m.get("normalised") or {}
    parts = []
    for k in ("rmse_e_per_atom", "rmse_f"):
        if m.get(k) is not None:
            label, unit = NAMES[k]
            r = norm.get(k, {}).get("ratio")
            parts.append(f"{label} {meV(m[k])} {unit}" + (f" ({ratio_text(r)}x baseline)" if r is not None else ""))
    return f"{name}: " + (", ".join(parts) or "-")


def verdicts(summary: dict) -> list[str]:
    """Sentences for every result that is not better than its composition-only baseline (ratio >=
    1), every metric where fine-tuning is worse than zero-shot, and unstable NVE runs, from a test
    summary (lamflow.ops.test.run_test's). Empty when all is well."""
    who = f"{summary.get('system', '?')}: {summary.get('role', 'model')}"
    out = []

    def check(norm: dict, where: str) -> None:
        for k, n in norm.items():
            if n.get("ratio") is not None and n["ratio"] >= 1.0:
                name, unit = NAMES.get(k, (k, ""))
                out.append(f"{where} {name} RMSE {meV(n['model'])} {unit} is {NOT_BETTER} "
                           f"(composition-only dummy {meV(n['baseline'])} {unit}, ratio {ratio_text(n['ratio'])})")

    check(summary.get("normalised", {}), who)
    subs = summary.get("systems", {})
    if len(subs) > 1:
        for name, d in subs.items():
            check(d.get("normalised", {}), f"{who} on {name}:")
    z, m = summary.get("zero_shot") or {}, summary.get("model") or {}
    for k in ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom"):
        if z.get(k) is not None and m.get(k) is not None and m[k] > z[k]:
            name, unit = NAMES[k]
            out.append(f"{who} fine-tuning is worse than zero-shot in {name} RMSE ({meV(m[k])} vs {meV(z[k])} {unit})")
    st = summary.get("stability")
    if st and st.get("total") and st["stable"] < st["total"]:
        out.append(f"{who} {st['total'] - st['stable']} of {st['total']} NVE runs unstable (|drift| > "
                   f"{st['tolerance']:.0e} eV/atom/ps, or the run failed)")
    return out


def baseline_table(tests: list[dict], caption: str = "") -> Table:
    """One row per tested system (and per molecule/sub-system when there are several): model,
    composition-only baseline and their ratio for E, F (and V), plus zero-shot where tested."""
    cols = [k for k in NAMES if any(k in t.get("normalised", {}) for t in tests)]
    zs = any(t.get("zero_shot") for t in tests)
    header = ["system", "model", "frames"]
    for k in cols:
        name, unit = NAMES[k]
        header += [f"{name} RMSE ({unit})", f"{name} baseline", f"{name} ratio"] + ([f"{name} zero-shot"] if zs else [])
    header.append("verdict")
    rows = []

    def row(label, role, nframes, norm, zero, flagged):
        r = [label, role, nframes]
        for k in cols:
            n = norm.get(k, {})
            r += [meV(n.get("model")), meV(n.get("baseline")), ratio_text(n.get("ratio"))]
            if zs:
                r.append(meV((zero or {}).get(k)))
        r.append("; ".join(flagged) if flagged else "better than baseline")
        rows.append(r)

    for t in tests:
        words = []
        norm = t.get("normalised", {})
        if any(n.get("ratio") is not None and n["ratio"] >= 1 for n in norm.values()):
            words.append(f"**{NOT_BETTER}**")
        z, m = t.get("zero_shot") or {}, t.get("model") or {}
        if any(z.get(k) is not None and m.get(k) is not None and m[k] > z[k] for k in cols):
            words.append("**worse than zero-shot**")
        row(t.get("system", "?"), t.get("role", "model"), t.get("nframes", "-"), norm, z, words)
        subs = t.get("systems", {})
        if len(subs) > 1:
            for name, d in subs.items():
                bad = any(n.get("ratio") is not None and n["ratio"] >= 1 for n in d.get("normalised", {}).values())
                row(f"  {t.get('system', '?')} / {name}", t.get("role", "model"), d.get("nframes", "-"),
                    d.get("normalised", {}), d.get("zero_shot"), [f"**{NOT_BETTER}**"] if bad else [])
    return Table(header, rows, caption or "errors next to the composition-only baseline (energy from element counts, "
                 "least squares on the training frames; zero forces and virials); ratio = model / baseline, < 1 is better")


def lambench_table(tests: list[dict], caption: str = "") -> Table:
    """LAMBench's stability (NVE energy drift vs 5e-4 eV/atom/ps) and efficiency (us/atom)."""
    rows = []
    for t in tests:
        st, ef = t.get("stability") or {}, t.get("efficiency") or {}
        drift = st.get("median_drift")
        rows.append([t.get("system", "?"), t.get("role", "model"),
                     f"{st['stable']}/{st['total']}" if st else "-",
                     "-" if drift is None else f"{drift:.2e}",
                     "-" if st.get("max_drift") is None else f"{st['max_drift']:.2e}",
                     "-" if ef.get("us_per_atom") is None else f"{ef['us_per_atom']:.1f}",
                     ef.get("natoms", "-") if ef else "-"])
    tol = next((t["stability"]["tolerance"] for t in tests if t.get("stability")), 5e-4)
    return Table(["system", "model", "stable NVE runs", "median drift (eV/atom/ps)", "max drift (eV/atom/ps)",
                  "us/atom/eval", "atoms"], rows,
                 caption or f"NVE stability: |energy drift| <= {tol:.0e} eV/atom/ps counts as stable (LAMBench); "
                 "failed runs count as unstable. Efficiency: one energy+force evaluation of a grown cell")


def kv_table(d: dict, caption: str = "") -> Table:
    """Scalars of a flat dict; RMSE/MAE values in meV."""
    rows = []
    for k, v in d.items():
        if isinstance(v, (dict, list)) or v is None:
            continue
        if isinstance(v, float) and (k.startswith(("rmse", "mae")) or "rmse" in k):
            rows.append([f"{k} (meV)", meV(v)])
        else:
            rows.append([k, f"{v:.4g}" if isinstance(v, float) else v])
    return Table(["key", "value"], rows, caption)


def bar_chart(metrics: dict | dict[str, dict], png: str | os.PathLike, keys=("rmse_e_per_atom", "rmse_f"),
              title: str = "") -> Path:
    """Bars per system (one group per model when given {label: metrics}), one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = {"model": metrics} if "systems" in metrics else dict(metrics)
    names = list(dict.fromkeys(n for m in models.values() for n in m.get("systems", {})))
    short = short_names(names)
    keys = [k for k in keys if any(m["systems"][n].get(k) is not None for m in models.values() for n in m["systems"])]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(max(5, 1.2 * len(names) + 3) * max(1, len(keys)) / 1.5, 4),
                             squeeze=False)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    for ax, k in zip(axes[0], keys):
        shown = []
        for j, (label, m) in enumerate(models.items()):
            vals = [1000 * (m["systems"].get(n, {}).get(k) or np.nan) for n in names]
            ax.bar(x + (j - (len(models) - 1) / 2) * width, vals, width, label=label)
            shown += [v for v in vals if np.isfinite(v) and v > 0]
        if shown and max(shown) > 100 * min(shown):  # errors spanning decades: log scale
            ax.set_yscale("log")
        ax.set_xticks(x, [short[n] for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(METRICS.get(k, k))
        if len(models) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_markdown(sections: list[Section], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the sections as Markdown; images are linked relative to the report's folder."""
    path = Path(path)
    here = path.parent.resolve()
    out = [f"# {title}\n"] if title else []
    for sec in sections:
        out.append(f"{'#' * sec.level} {sec.title}\n")
        if sec.text:
            out.append(sec.text.rstrip() + "\n")
        for t in sec.tables:
            out.append(t.markdown() + "\n")
        for img in sec.images:
            rel = Path(os.path.relpath(Path(img).resolve(), here)).as_posix()
            out.append(f"![{Path(img).stem}]({rel})\n")
    return atomic_write_text(path, "\n".join(out))


# ----------------------------------------------------------------------------- stage sections


def clean_section(report: dict, out_dir: str | os.PathLike | None = None, title: str = "Data cleaning") -> Section:
    """clean.json -> kept/dropped per system, drops by reason, coverage, zero-shot errors."""
    out = Path(out_dir) if out_dir is not None else None
    text = [f"Kept **{report['kept']}** of {report['nframes']} frames ({report['dropped']} dropped)."]
    cov = report.get("coverage", {})
    if cov.get("model_type_map") is not None:
        unc = cov.get("uncovered") or []
        text.append(f"Elements in the data: {', '.join(cov['data_elements'])}; "
                    + (f"**not covered by the pretrained model: {', '.join(unc)}**." if unc else "all covered by the pretrained model."))
    if report.get("similar", {}).get("count"):
        text.append(f"{report['similar']['count']} frames have the structure of an earlier frame but other labels (kept).")
    text += report.get("notes", [])
    tables = [Table(["system", "frames", "kept", "dropped"],
                    [[r["name"], r["nframes"], r["kept"], r["dropped"]] for r in report["systems"]], "frames per system"),
              Table(["reason", "frames"], [[k, v] for k, v in report["counts_by_reason"].items()], "dropped frames by reason")]
    drops = report.get("dropped_frames", [])
    if drops:
        tables.append(Table(["system", "frame", "reason", "value", "detail"],
                            [[d["system"], d["frame"], d["reason"], f"{d['value']:.4g}", d.get("detail", "")] for d in drops[:50]],
                            "dropped frames" + (f" (first 50 of {len(drops)}; all in clean.json)" if len(drops) > 50 else "")))
    if report.get("zero_shot", {}).get("systems"):
        tables.append(metrics_table(report["zero_shot"], "zero-shot errors of the pretrained model (energy bias refit)"))
    if report.get("active", {}).get("curve"):
        tables.append(curve_table(report["active"]["curve"]))
    images = []
    if out is not None:
        for name in ("clean.png", "zero_shot_parity.png", report.get("active", {}).get("lcurve_png")):
            if name and (out / name).is_file():
                images.append(out / name)
    return Section(title, "\n\n".join(text), tables, images)


def curve_table(curve: list[dict], caption: str = "learning curve (validation error vs training frames)") -> Table:
    keys = _columns(curve, ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom"))
    return Table(["round", "training frames"] + [METRICS[k] for k in keys],
                 [[r.get("round", "-"), r["nsamples"]] + [meV(r.get(k)) for k in keys] for r in curve], caption)


def folder_section(name: str, folder: str | os.PathLike, level: int = 2) -> Section:
    """A section from the files a stage wrote: known JSON files become tables, PNGs are embedded."""
    folder = Path(folder)
    if not folder.is_dir():
        return Section(name, f"No outputs found ({folder}).", level=level)
    sec = Section(name, level=level)

    def load(f):
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None

    for f in sorted(folder.glob("*.json")):
        d = load(f)
        if not isinstance(d, dict):
            continue
        if f.name == "clean.json" and "counts_by_reason" in d:
            c = clean_section(d, folder)
            sec.text, sec.tables = c.text, sec.tables + c.tables
        elif f.name == "compare.json" and "first" in d and "second" in d:
            sec.tables.append(compare_table(d["first"], d["second"], tuple(d.get("labels", ("zero-shot", "fine-tuned"))),
                                            f"{f.name}"))
        elif "systems" in d and "overall" in d and isinstance(d["systems"], dict):
            sec.tables.append(metrics_table(d, f.name))
        elif "curve" in d and isinstance(d["curve"], list):
            sec.tables.append(curve_table(d["curve"]))
        else:
            t = kv_table(d, f.name)
            if t.rows:
                sec.tables.append(t)
    pngs = sorted(folder.rglob("*.png"), key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    sec.images = pngs[:24]
    return sec


def gather_report(stages: dict[str, str | os.PathLike] | list[tuple[str, str | os.PathLike]], path: str | os.PathLike,
                  title: str = "lamflow run report", intro: str = "") -> Path:
    """One Markdown report from the output folders of a run's stages, in the order given."""
    items = list(stages.items()) if isinstance(stages, dict) else list(stages)
    sections = [Section("Summary", intro)] if intro else []
    sections += [folder_section(name, folder) for name, folder in items]
    return write_markdown(sections, path, title)
