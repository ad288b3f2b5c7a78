"""`lamflow status ID`: the run's state, each step's phase and its headline numbers."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("status", help="per-stage state and key numbers of a run")
    p.add_argument("id", help="run id (printed by submit)")
    p.add_argument("--workdir", help="debug runs: the work directory (default: LAMFLOW_WORKDIR or lamflow-runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import find_run

    print_status(find_run(args.id, args.workdir))
    return 0


def headline(stage: str, s: dict | None) -> str:
    """One short line of numbers from a step's summary."""
    if not s:
        return ""
    meV = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    if stage == "pretrain":
        from lamflow.model.tasks.report import head_text  # here, not at the top: it loads torch (~1 s) for every command

        return "; ".join(head_text(h, m) for h, m in s.get("heads", {}).items())
    if stage == "finetune":
        m = s.get("metrics", {})
        return f"valid E {meV(m.get('rmse_e_per_atom'))} meV/atom, F {meV(m.get('rmse_f'))} meV/A"
    if stage == "test":
        return test_headline(s)
    if stage == "clean":
        return "; ".join(f"{n}: kept {d.get('kept')}, dropped {d.get('dropped')}" for n, d in s.get("datasets", {}).items())
    if stage == "distill":
        st, te = s.get("student", {}), s.get("teacher", {})
        return f"student F {meV(st.get('rmse_f'))} meV/A vs teacher {meV(te.get('rmse_f'))} meV/A"
    if stage == "compress":
        sp = s.get("speedup")
        return (f"max |dF| {meV(s.get('max_abs_df'))} meV/A, speed-up {sp:.2f}x"
                + (f" on {s['natoms']} atoms" if s.get("natoms") else "")) if sp else ""
    if stage == "report":
        flags = s.get("flags") or []
        student = f"student {test_headline(s['student_test'])}; " if s.get("student_test") else ""
        return student + (f"{len(flags)} warning(s): {flags[0]}{' ...' if len(flags) > 1 else ''}; " if flags else "") + \
            "report.md ready (lamflow download ID)"
    return ""


def test_headline(s: dict) -> str:
    """E/F RMSE with the baseline ratio (and zero-shot), NVE stability, us/atom; warnings counted."""
    meV = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    m, z, n = s.get("model", {}), s.get("zero_shot") or {}, s.get("normalised", {})
    parts = []
    for key, name, unit in (("rmse_e_per_atom", "E", "meV/atom"), ("rmse_f", "F", "meV/A")):
        r = (n.get(key) or {}).get("ratio")
        parts.append(f"{name} {meV(m.get(key))} {unit}" + (f" ({r:.2f}x base" if r is not None else " (")
                     + (f", zero-shot {meV(z.get(key))})" if z.get(key) is not None else ")"))
    st, ef = s.get("stability"), s.get("efficiency")
    if st:
        parts.append(f"NVE stable {st['stable']}/{st['total']} (drift <= {st['tolerance']:.0e} eV/atom/ps)")
    if ef and ef.get("us_per_atom") is not None:
        parts.append(f"{ef['us_per_atom']:.1f} us/atom @ {ef['natoms']}")
    if s.get("flags"):
        parts.append(f"{len(s['flags'])} warning(s)")
    return ", ".join(parts).replace(" ()", "")


def print_status(run) -> None:
    from ...runs import run_status, steps_of

    print(f"{run.id} ({run.mode}): {run_status(run)}")
    times = run.backend.step_times(run)
    for i in steps_of(run):
        name = i.key + (f" [{i.system}]" if i.system else "")
        t = times.get(i.key, {})
        took = f"{t['end'] - t['start']:6.1f}s" if "end" in t else " " * 7
        print(f"  {name:<28} {i.phase:<10} {took} {headline(i.stage, i.summary)}".rstrip())
