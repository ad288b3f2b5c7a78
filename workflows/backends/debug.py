"""The debug backend: the pipeline runs here and now, in dflow's debug mode (`lamflow submit --debug`).

Every step runs as a local process (or, with --container, in the step image) under
`<workdir>/<run id>/<step key>/` (dflow's layout). lamflow keeps its own records next to them:

    <workdir>/.lamflow/runs/<run id>.json     the resolved spec, inputs and parent run (for retry)
    <workdir>/.lamflow/<group>/data/          the staged datasets (symlinks to your data)
    <workdir>/.lamflow/<group>/resume/<key>/  training checkpoints that survive a failed step
    <workdir>/.lamflow/logs/<run id>.log      dflow's own output

While dflow runs the steps, a watcher thread prints each step's phase changes and times them; a
failed step's one-line error (its log's last exception, with staged paths turned back into the
user's) goes into the record and onto the console.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..dag import BuildOptions, Inputs, build_workflow, display_key, stage_of, step_keys
from ..dflow_config import configure_debug, workdir_of
from ..inputs import dataset_digests, localize, stage_data, stage_pretrained
from ..runs import FINAL, META, Run, new_run_id, read_meta, write_meta
from ..spec import PipelineSpec, SpecError, as_list, check_spec, resolved_type_map, spec_summary
from ..stages import ORDER
from .base import Backend


class DebugBackend(Backend):
    name = "debug"

    def submit(self, spec: PipelineSpec, *, check_data: bool = True, workdir: Path | None = None, container=None,
               progress=print, **_) -> tuple[str, str]:
        return submit_debug(spec, workdir=workdir, check_data=check_data, container=container, progress=progress)

    def find(self, run_id: str, workdir: Path) -> Run | None:
        meta = read_meta(workdir, run_id)
        return Run(run_id, self, workdir, meta) if meta is not None else None

    def runs(self, workdir: Path) -> list[dict]:
        rows = []
        runs_dir = workdir / META / "runs"
        if runs_dir.is_dir():
            for f in sorted(runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
                m = json.loads(f.read_text())
                st = workdir / m["id"] / "status"
                rows.append({"id": m["id"], "mode": self.name,
                             "status": st.read_text().strip() if st.is_file() else "Pending",
                             "created": m.get("created"), "parent": m.get("parent")})
        return rows

    def workflow(self, run: Run):
        from dflow import Workflow

        configure_debug(run.workdir, 1)
        return Workflow(id=run.id)

    def status(self, run: Run) -> str:
        f = run.workdir / run.id / "status"
        return f.read_text().strip() if f.is_file() else "Pending"

    def log(self, run: Run, step) -> str:
        f = run.workdir / run.id / step.key / "log.txt"
        return f.read_text() if f.is_file() else "(no log yet)"

    def fetch(self, run: Run, artifact, out_dir: Path) -> list[Path]:
        got = []
        for item in sorted(Path(artifact.local_path).iterdir()):
            if item.name == ".dflow":
                continue
            dst = out_dir / item.name
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            if item.is_dir():
                shutil.copytree(item, dst, symlinks=False)
            else:
                shutil.copy2(item, dst)
            got.append(dst)
        return got

    def step_times(self, run: Run) -> dict[str, dict]:
        return (run.meta or {}).get("steps", {})

    def resubmit(self, run: Run, spec: PipelineSpec, *, reuse: list, rerun: set[str], keys: list[str],
                 progress) -> tuple[str, str]:
        root = Path(resume_root(run))
        for k in keys:
            if stage_of(k) in rerun and (root / k).exists():
                shutil.rmtree(root / k)  # --from: train from scratch, not from the old final checkpoint
        restage = dataset_digests(spec) != run.meta.get("digests", dataset_digests(run.spec))
        return submit_debug(spec, workdir=run.workdir, reuse=reuse, parent={**run.meta, "resume_root": str(root)},
                            restage=restage, progress=progress)


def resume_root(run: Run) -> str:
    """The folder of a run's training checkpoints (shared with the runs retried from it)."""
    return run.meta.get("resume_root") or str(run.workdir / META / run.meta["group"] / "resume")


def submit_debug(spec: PipelineSpec, *, workdir: Path | None = None, check_data: bool = True, reuse=None,
                 parent: dict | None = None, restage: bool = False, progress=print, container=None) -> tuple[str, str]:
    """Run the pipeline locally; return (run id, final status). `reuse`: dflow steps of an earlier
    run to reuse (retry; only those whose key, input hash included, is a step of this run);
    `parent`: that run's record, whose staged inputs (unless `restage`: the spec's data changed)
    and checkpoint folders this run shares. `container`: a containers.Container to run every step
    in (a retry uses its parent's).

    Steps' output (and dflow's tracebacks) go to the log files, not the console: each step's to
    <workdir>/<run id>/<step>/log.txt, dflow's to <workdir>/.lamflow/logs/<run id>.log; the console
    gets the phase changes, and a failing step's one-line error (`failures`)."""
    from ..containers import for_run, workflow_context

    container = for_run(container, parent)
    if progress is print:  # bound now: while steps run, sys.stdout is the log file
        progress = functools.partial(print, file=sys.stdout, flush=True)
    if parent is None:
        problems = check_spec(spec, data=False)
        if problems:
            raise SpecError(problems)
        spec = localize(spec)  # s3:// datasets fetched into the cache
        problems = check_spec(spec, data=check_data)
        if problems:
            raise SpecError(problems)
    workdir = workdir or workdir_of(spec)
    workdir.mkdir(parents=True, exist_ok=True)
    configure_debug(workdir, spec.debug.pool_workers)
    rid = new_run_id(spec.name, workdir)
    if parent is None or restage:
        group = rid
        type_map = resolved_type_map(spec)
        gdir = workdir / META / group
        stage_data(spec, gdir)
        pre = stage_pretrained(spec, gdir)
        inputs = {"data": str(gdir / "data"), "pretrained": str(pre) if pre else None}
    else:
        group, type_map, inputs = parent["group"], parent["type_map"], parent["inputs"]
    resume = (parent or {}).get("resume_root") or str(workdir / META / (parent or {}).get("group", group) / "resume")
    from dflow import upload_artifact

    arts = Inputs(data=upload_artifact(inputs["data"]),
                  pretrained=upload_artifact(inputs["pretrained"]) if inputs.get("pretrained") else None)
    opts = BuildOptions(mode="debug", type_map=type_map, resume_root=resume, digests=dataset_digests(spec),
                        threads=spec.debug.threads)
    keys = step_keys(spec, opts)
    if reuse is not None:
        reuse = [st for st in reuse if st.key in keys]  # a changed step's old key is no step of this run
        progress(f"reusing {len(reuse)} succeeded step(s): {', '.join(sorted(display_key(st.key) for st in reuse)) or '-'}")
    meta = {"id": rid, "mode": "debug", "group": group, "parent": parent["id"] if parent else None,
            "created": time.time(), "type_map": type_map, "inputs": inputs, "resume_root": resume,
            "digests": opts.digests, "step_keys": keys, **spec_summary(spec),
            **({"container": container.record()} if container else {})}
    write_meta(workdir, meta)
    wf = build_workflow(spec, arts, opts, id=rid, **workflow_context(container, workdir, inputs, opts.resume_root))
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.debug.threads))
    progress(f"run {rid}: {workdir / rid}")
    stop = threading.Event()
    timings: dict[str, dict] = {}
    watcher = threading.Thread(target=_watch_debug, args=(workdir / rid, stop, progress, timings), daemon=True)
    watcher.start()
    t0 = time.time()
    log = debug_log(workdir, rid)
    try:
        with _quiet_dflow(), _output_to(log):
            wf.submit(reuse_step=reuse)
        _wait_for_steps(workdir / rid)  # a step still finishing when dflow returns belongs in the table
    finally:
        stop.set()
        watcher.join()
    status = (workdir / rid / "status").read_text().strip() if (workdir / rid / "status").is_file() else "Failed"
    for key in {display_key(k) for k in keys} - set(timings):  # never started (after a failure upstream)
        timings[key] = {"phase": "Omitted"}
    for st in reuse or []:
        timings.setdefault(display_key(st.key), {})["reused"] = True
    meta["finished"] = time.time()
    meta["status"] = status
    meta["wall_s"] = time.time() - t0
    meta["steps"] = timings
    meta["failures"] = failures(workdir / rid, spec) if status != "Succeeded" else {}
    meta["log"] = str(log)
    write_meta(workdir, meta)
    return rid, status


def debug_log(workdir: Path, rid: str) -> Path:
    return workdir / META / "logs" / f"{rid}.log"


# ----------------------------------------------------------------------------- the watcher


def _watch_debug(wfdir: Path, stop: threading.Event, progress, timings: dict) -> None:
    """Print each step's phase changes; record when each step was first seen running and when it
    ended (seconds since the run started, to the 0.2 s polling interval)."""
    seen: dict[str, str] = {}
    t0 = time.time()
    while True:
        done = stop.wait(0.2)
        now = time.time() - t0
        for full, phase in _debug_phases(wfdir).items():
            key = display_key(full)
            if seen.get(key) != phase:
                seen[key] = phase
                progress(f"  [{now:6.1f}s] {key:<14} {phase}")
                t = timings.setdefault(key, {"start": now})
                if phase in FINAL:
                    t["end"], t["phase"] = now, phase
        if done:
            return


def _debug_phases(wfdir: Path) -> dict[str, str]:
    out = {}
    if not wfdir.is_dir():
        return out
    for d in sorted(wfdir.iterdir()):
        f = d / "phase"
        if d.is_dir() and f.is_file() and stage_of(d.name) in ORDER:
            out[d.name] = f.read_text().strip()
    return out


def _wait_for_steps(wfdir: Path, timeout: float = 600.0, poll: float = 0.2) -> None:
    """Until every started step has a final phase (or its process is gone)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        busy = []
        for key, phase in _debug_phases(wfdir).items():
            if phase in FINAL:
                continue
            pid = wfdir / key / "pid"
            try:
                os.kill(int(pid.read_text()), 0)
                busy.append(key)
            except (OSError, ValueError):
                continue  # no process: nothing to wait for
        if not busy:
            return
        time.sleep(poll)


@contextmanager
def _output_to(path: Path):
    """sys.stdout and sys.stderr into `path` (dflow's step processes inherit them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as f:
        sys.stdout = sys.stderr = f
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


@contextmanager
def _quiet_dflow():
    """dflow prints a line per skipped/finished step; lamflow prints its own progress."""
    import logging

    lg, root = logging.getLogger("dflow"), logging.getLogger()
    old = lg.level, root.level
    lg.setLevel(logging.WARNING)
    root.setLevel(logging.ERROR)  # dflow warns "step (key: ...) skipped" on the root logger for each reused step
    try:
        yield
    finally:
        lg.setLevel(old[0])
        root.setLevel(old[1])


# ----------------------------------------------------------------------------- a failed step's one line


ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\w*): (.+)$")
STAGED = re.compile(r"\S*?/(data|cleaned)/([A-Za-z0-9][A-Za-z0-9_.-]*)/(train|valid|test)/(\d+)(?![\d])")


def failure_line(log_text: str) -> str:
    """The step's own one-line error: the last exception line of its log (a FatalError's message
    is lamflow's error as the user would see it from the command)."""
    lines = [ln.rstrip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = ERROR_LINE.match(ln)
        if m:
            cls = m.group(1).rsplit(".", 1)[-1]
            return m.group(2) if cls in ("FatalError", "TransientError") else f"{cls}: {m.group(2)}"
    return lines[-1] if lines else "(the step wrote no log)"


def user_paths(text: str, spec: PipelineSpec) -> str:
    """Staged copies of the data (<...>/data/<dataset>/<split>/<i>) named by the user's path."""

    def sub(m):
        kind, name, split, i = m.group(1), m.group(2), m.group(3), int(m.group(4))
        ds = spec.datasets.get(name)
        paths = as_list(getattr(ds, split)) if ds is not None else []
        if i >= len(paths):
            return m.group(0)
        return paths[i] if kind == "data" else f"{paths[i]} (its cleaned copy)"

    return STAGED.sub(sub, text)


def failures(wfdir: Path, spec: PipelineSpec) -> dict[str, dict]:
    """display key -> {"error": one line, "log": path} for each failed step of a debug run."""
    out = {}
    for key, phase in _debug_phases(wfdir).items():
        if phase not in ("Failed", "Error"):
            continue
        f = wfdir / key / "log.txt"
        text = f.read_text(errors="replace") if f.is_file() else ""
        out[display_key(key)] = {"error": user_paths(failure_line(text), spec), "log": str(f)}
    return out
