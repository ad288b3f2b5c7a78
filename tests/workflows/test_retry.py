"""`lamflow retry`: step keys hold a hash of each step's inputs, so a fixed spec reruns exactly the
changed step and those after it; `--from` retrains from scratch; a finished run has nothing to
retry; the run record lists every step; a failing step shows its own one line with the user's
path. The step ledger (LAMFLOW_STEP_LOG) records each step that really ran."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, data_path

from lamflow.workflows.backends.debug import _wait_for_steps, failure_line, user_paths
from lamflow.workflows.cli import main
from lamflow.workflows.dag import BuildOptions, display_key, input_hashes, stage_of, step_keys
from lamflow.workflows.runs import read_meta
from lamflow.workflows.spec import spec_from_dict

CH4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}


def doc(tmp_path: Path, **test) -> dict:
    return {"name": "fix", "datasets": {"ch4": CH4},
            "stages": {"pretrain": {"datasets": ["ch4"], **copy.deepcopy(TINY)}, "test": {"systems": ["ch4"], **test}},
            "debug": {"workdir": str(tmp_path / "runs"), "pool_workers": 1}}


def write(tmp_path: Path, d: dict, name: str) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def ledger(path: Path) -> list[str]:
    lines = sorted(path.read_text().splitlines()) if path.exists() else []
    path.unlink(missing_ok=True)
    return lines


def run_id(out: str) -> str:
    return next(ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("run "))


def hashes(d: dict) -> dict[str, str]:
    return input_hashes(spec_from_dict(d, Path(".")), BuildOptions(type_map=["H", "C"], digests={"ch4": "d1"}))


def test_input_hash_changes_with_the_step_and_everything_downstream_only(tmp_path):
    base = doc(tmp_path)
    h0 = hashes(base)
    d = copy.deepcopy(base)
    d["stages"]["test"]["zero_shot"] = False
    h1 = hashes(d)
    assert h1["pretrain"] == h0["pretrain"] and h1["test"] != h0["test"] and h1["report"] != h0["report"]
    d = copy.deepcopy(base)
    d["stages"]["pretrain"]["training"]["numb_steps"] = 5
    h2 = hashes(d)
    assert all(h2[s] != h0[s] for s in ("pretrain", "test", "report"))
    d = copy.deepcopy(base)
    d["stages"]["pretrain"]["resources"] = {"cpu": 4}  # where a step runs does not change its result
    assert hashes(d) == h0
    changed_data = input_hashes(spec_from_dict(base, Path(".")), BuildOptions(type_map=["H", "C"], digests={"ch4": "d2"}))
    assert all(changed_data[s] != h0[s] for s in ("pretrain", "test", "report"))
    keys = step_keys(spec_from_dict(base, Path(".")), BuildOptions(type_map=["H", "C"], digests={"ch4": "d1"}))
    assert [display_key(k) for k in keys] == ["pretrain", "test-0", "report"]
    assert [stage_of(k) for k in keys] == ["pretrain", "test", "report"]


def test_failure_line_is_the_steps_own_error_naming_the_users_path(tmp_path):
    spec = spec_from_dict(doc(tmp_path), Path("."))
    staged = "/w/.lamflow/fix-abc/data/ch4/valid/0"
    log = ("step 0 ...\nTraceback (most recent call last):\n  File \"x\", line 1\n"
           f"dflow.python.op.FatalError: {staged} frame 3: force contains NaN\n")
    assert user_paths(failure_line(log), spec) == f"{CH4['valid']} frame 3: force contains NaN"
    assert failure_line("Traceback ...\nRuntimeError: boom\n") == "RuntimeError: boom"


def test_wait_for_steps_waits_for_a_step_still_finishing(tmp_path):
    step = tmp_path / "wf" / "test-1-h0123abcd"
    step.mkdir(parents=True)
    (step / "phase").write_text("Running")
    code = f"import time, pathlib; time.sleep(1.0); pathlib.Path({str(step / 'phase')!r}).write_text('Succeeded')"
    p = subprocess.Popen([sys.executable, "-c", code])
    (step / "pid").write_text(str(p.pid))
    t0 = time.time()
    _wait_for_steps(tmp_path / "wf")
    assert (step / "phase").read_text() == "Succeeded" and time.time() - t0 >= 0.5
    p.wait()


@pytest.mark.slow
def test_fix_and_retry_reruns_the_changed_step_and_later_ones_and_from_retrains(tmp_path, monkeypatch, capsys):
    log = tmp_path / "ledger"
    monkeypatch.setenv("LAMFLOW_STEP_LOG", str(log))
    monkeypatch.setenv("LAMFLOW_FAIL_STAGE", "test")
    wd = tmp_path / "runs"
    assert main(["submit", str(write(tmp_path, doc(tmp_path), "pipe.yaml")), "--debug"]) == 1
    out, err = capsys.readouterr()
    first = run_id(out)
    assert ledger(log) == ["pretrain", "test ch4"]
    assert "Traceback" not in out + err and "test-0 failed: RuntimeError: test: failing on purpose" in out
    assert f"full log: {wd / first}" in out
    meta = read_meta(wd, first)
    assert {k: v.get("phase") for k, v in meta["steps"].items()} == {"pretrain": "Succeeded", "test-0": "Failed",
                                                                    "report": "Omitted"}
    assert Path(meta["log"]).is_file()

    # the fix: a changed test setting; pretrain is reused, test and report rerun
    monkeypatch.delenv("LAMFLOW_FAIL_STAGE")
    fixed = write(tmp_path, doc(tmp_path, zero_shot=False), "fixed.yaml")
    assert main(["retry", first, "--spec", str(fixed), "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out
    second = run_id(out)
    assert "reusing 1 succeeded step(s): pretrain" in out
    assert ledger(log) == ["report", "test ch4"]
    meta = read_meta(wd, second)
    assert meta["spec"]["stages"]["test"]["zero_shot"] is False and meta["parent"] == first
    assert set(meta["steps"]) == {"pretrain", "test-0", "report"} and meta["steps"]["pretrain"].get("reused")

    # nothing left to do: no new run
    runs = sorted((wd / ".lamflow" / "runs").glob("*.json"))
    assert main(["retry", second, "--workdir", str(wd)]) == 0
    assert "nothing to retry" in capsys.readouterr().out
    assert sorted((wd / ".lamflow" / "runs").glob("*.json")) == runs and ledger(log) == []

    # --from pretrain trains again from step 0, not from the old final checkpoint
    assert main(["retry", second, "--from", "pretrain", "--workdir", str(wd)]) == 0
    third = run_id(capsys.readouterr().out)
    assert ledger(log) == ["pretrain", "report", "test ch4"]
    key = next(k for k in read_meta(wd, third)["step_keys"] if k.startswith("pretrain"))
    text = (wd / third / key / "log.txt").read_text()
    assert "restarting from" not in text and "step      0/4" in text
    summary = json.loads((wd / third / key / "outputs" / "parameters" / "summary").read_text())
    assert summary["steps"] == 4
