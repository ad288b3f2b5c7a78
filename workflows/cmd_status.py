"""`lamflow status ID`: the run's state, each step's phase and its headline numbers."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("status", help="per-stage state and key numbers of a run")
    p.add_argument("id", help="run id (printed by submit)")
    p.add_argument("--workdir", help="debug runs: the work directory (default: LAMFLOW_WORKDIR or lamflow-runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .engine import find_run

    print_status(find_run(args.id, args.workdir))
    return 0


def headline(stage: str, s: dict | None) -> str:
    """One short line of numbers from a step's summary."""
    if not s:
        return ""
    meV = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    if stage == "pretrain":
        return "; ".join(f"{h}: E {meV(m.get('rmse_e_per_atom'))} meV/atom, F {meV(m.get('rmse_f'))} meV/A"
                         for h, m in s.get("heads", {}).items())
    if stage == "finetune":
        m = s.get("metrics", {})
        return f"valid E {meV(m.get('rmse_e_per_atom'))} meV/atom, F {meV(m.get('rmse_f'))} meV/A"
    if stage == "test":
        m, z = s.get("model", {}), s.get("zero_shot")
        line = f"E {meV(m.get('rmse_e_per_atom'))} meV/atom, F {meV(m.get('rmse_f'))} meV/A"
        if z:
            line += f" (zero-shot E {meV(z.get('rmse_e_per_atom'))}, F {meV(z.get('rmse_f'))})"
        return line
    if stage == "clean":
        return "; ".join(f"{n}: kept {d.get('kept')}, dropped {d.get('dropped')}" for n, d in s.get("datasets", {}).items())
    if stage == "distill":
        st, te = s.get("student", {}), s.get("teacher", {})
        return f"student F {meV(st.get('rmse_f'))} meV/A vs teacher {meV(te.get('rmse_f'))} meV/A"
    if stage == "compress":
        sp = s.get("speedup")
        return f"max |dF| {meV(s.get('max_abs_df'))} meV/A, speed-up {sp:.2f}x" if sp else ""
    if stage == "report":
        return "report.md ready (lamflow download ID)"
    return ""


def print_status(run) -> None:
    from .engine import run_status, steps_of

    print(f"{run.id} ({run.mode}): {run_status(run)}")
    times = (run.meta or {}).get("steps", {}) if run.mode == "debug" else {}
    for i in steps_of(run):
        name = i.key + (f" [{i.system}]" if i.system else "")
        t = times.get(i.key, {})
        took = f"{t['end'] - t['start']:6.1f}s" if "end" in t else " " * 7
        print(f"  {name:<28} {i.phase:<10} {took} {headline(i.stage, i.summary)}".rstrip())
