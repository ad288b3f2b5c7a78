"""Wall time of the quickstart pipeline in dflow's debug mode, split by step, and the time to
render the Argo manifest of a pipeline with 100 downstream systems.

    python bench/pipeline_time.py                 # both
    python bench/pipeline_time.py --render-only   # the 100-system render only (seconds)

Targets: quickstart <= 5 min on a 2-core CPU; 100-system render <= 5 s. Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "templates" / "quickstart.yaml"


def absolute_quickstart(tmp: Path, workdir: Path) -> Path:
    """The quickstart with absolute data paths and its own work directory."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    for d in doc["datasets"].values():
        for split in ("train", "valid", "test"):
            if split in d:
                d[split] = str((QUICKSTART.parent / d[split]).resolve())
    doc["debug"] = {**doc.get("debug", {}), "workdir": str(workdir)}
    p = tmp / "quickstart.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def quickstart(tmp: Path, keep: Path | None = None) -> None:
    from lamflow.workflows.backends.debug import submit_debug
    from lamflow.workflows.runs import read_meta
    from lamflow.workflows.spec import load_spec

    workdir = tmp / "runs"
    spec = load_spec(absolute_quickstart(tmp, workdir))
    load0 = os.getloadavg()[0]
    t0 = time.time()
    rid, status = submit_debug(spec, workdir=workdir, progress=lambda *a: None)
    wall = time.time() - t0
    meta = read_meta(workdir, rid)
    print(f"quickstart ({status}): {wall:.1f} s wall, {os.cpu_count()} CPU cores, load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end (the wall time grows with the load); target <= 300 s")
    print(f"  {'step':<16}{'start s':>9}{'seconds':>9}")
    for key, t in sorted(meta.get("steps", {}).items(), key=lambda kv: kv[1]["start"]):
        print(f"  {key:<16}{t['start']:9.1f}{t.get('end', float('nan')) - t['start']:9.1f}")
    by_stage: dict[str, float] = {}
    for key, t in meta.get("steps", {}).items():
        stage = key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key
        by_stage[stage] = by_stage.get(stage, 0.0) + t.get("end", t["start"]) - t["start"]
    print("  per stage (sum over its steps): " + ", ".join(f"{k} {v:.1f} s" for k, v in by_stage.items()))
    print_results(workdir, rid)
    if keep is not None:  # the report folder (report.md, PNGs, summary.json), to read after the run
        import shutil

        src = next((workdir / rid).rglob("outputs/artifacts/report/report"), None)
        if src is not None:
            shutil.copytree(src, keep, dirs_exist_ok=True)
            print(f"  report copied to {keep}")


def print_results(workdir: Path, rid: str) -> None:
    """The report's summary table: every model against its baseline, compression speed-up."""
    import json

    f = next((workdir / rid).rglob("report/summary.json"), None)
    if f is None:
        return
    s = json.loads(f.read_text())
    tests = list(s.get("test", {}).values()) + ([s["student_test"]] if s.get("student_test") else [])
    for t in tests:
        n = t.get("normalised", {})
        z = t.get("zero_shot") or {}
        print(f"  {t.get('role')} {t['system']} ({t.get('split')}): " + ", ".join(
            f"{k} {1000 * v['model']:.2f} vs baseline {1000 * v['baseline']:.2f} (ratio {v['ratio']:.3f})" for k, v in n.items())
            + (f"; zero-shot E {1000 * z['rmse_e_per_atom']:.2f}, F {1000 * z['rmse_f']:.2f}" if z else ""))
        st, ef = t.get("stability") or {}, t.get("efficiency") or {}
        if st:
            print(f"    NVE stable {st['stable']}/{st['total']}, median drift {st.get('median_drift')}; "
                  f"{ef.get('us_per_atom')} us/atom at {ef.get('natoms')} atoms")
    k = s.get("compress", {})
    if k:
        print(f"  compress: speed-up {k.get('speedup'):.2f}x on {k.get('natoms')} atoms "
              f"({k.get('seconds_model'):.4f} s -> {k.get('seconds_compressed'):.4f} s), max |dF| {k.get('max_abs_df')}")
    print(f"  warnings: {s.get('flags') or 'none'}")


def hundred_systems(tmp: Path) -> Path:
    doc = yaml.safe_load(absolute_quickstart(tmp, tmp / "runs").read_text())
    ch4 = doc["datasets"]["ch4"]
    for i in range(100):
        doc["datasets"][f"sys{i:03d}"] = dict(ch4)
    doc["stages"]["finetune"]["systems"] = [f"sys{i:03d}" for i in range(100)]
    doc["stages"]["distill"]["teacher"] = "sys000"
    doc["stages"]["distill"].pop("dataset", None)
    p = tmp / "hundred.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def render(tmp: Path) -> None:
    from lamflow.workflows.render import render_manifest
    from lamflow.workflows.spec import check_spec, load_spec

    pipe = hundred_systems(tmp)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "lamflow.workflows.cli", "render", str(pipe), "-o", str(tmp / "wf.yaml")],
                       capture_output=True, text=True)
    cold = time.time() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    spec = load_spec(pipe)
    check_spec(spec, data=False)
    render_manifest(spec)  # warm: imports (torch, dflow, kubernetes) done
    t0 = time.time()
    m = render_manifest(spec)
    warm = time.time() - t0
    size = (tmp / "wf.yaml").stat().st_size
    print(f"render, 100 downstream systems: `lamflow render` {cold:.2f} s (new process, imports included); "
          f"render_manifest {warm:.2f} s (warm); {len(m['spec']['templates'])} templates, {size / 1024:.0f} KiB; target <= 5 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--keep", type=Path, help="copy the quickstart's report folder here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamflow-bench-") as t:
        tmp = Path(t)
        render(tmp)
        if not args.render_only:
            quickstart(tmp, args.keep)


if __name__ == "__main__":
    main()
