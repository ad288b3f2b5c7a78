"""Whole pipelines in dflow's debug mode (local processes, no server): the quickstart end to end,
and `lamflow retry` rerunning only what failed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY, data_path

from lamflow.workflows.cli import main

REPO = Path(__file__).resolve().parents[2]



def small_pipeline(tmp_path: Path) -> Path:
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    doc = {"name": "retry", "datasets": {"ch4a": ch4, "ch4b": ch4},
           "stages": {"pretrain": {"datasets": ["ch4a"], **TINY},
                      "test": {"systems": ["ch4a", "ch4b"], "stability": None, "efficiency": None}},  # errors only: fast
           "debug": {"workdir": str(tmp_path / "runs"), "pool_workers": 1}}
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def ledger(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines()) if path.exists() else []


def run_id(out: str) -> str:
    return next(ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("run "))


@pytest.mark.slow
def test_retry_reruns_only_the_failed_step_and_reuses_the_rest(tmp_path, monkeypatch, capsys):
    pipe = small_pipeline(tmp_path)
    log = tmp_path / "ledger"
    monkeypatch.setenv("LAMFLOW_STEP_LOG", str(log))
    monkeypatch.setenv("LAMFLOW_FAIL_STAGE", "test:ch4b")  # the second test step fails on the first run
    assert main(["submit", str(pipe), "--debug"]) == 1
    first = run_id(capsys.readouterr().out)
    assert ledger(log) == ["pretrain", "test ch4a", "test ch4b"]  # report never ran
    monkeypatch.delenv("LAMFLOW_FAIL_STAGE")
    wd = str(tmp_path / "runs")
    assert main(["logs", first, "test-1", "--workdir", wd]) == 0
    assert "failing on purpose" in capsys.readouterr().out
    assert main(["watch", first, "--workdir", wd, "--interval", "0.1"]) == 1  # already over: prints and exits
    watched = capsys.readouterr().out
    assert "test-1         Failed" in watched and f"{first}: Failed" in watched

    log.unlink()
    assert main(["retry", first, "--workdir", wd]) == 0
    out = capsys.readouterr().out
    second = run_id(out)
    assert second != first
    assert ledger(log) == ["report", "test ch4b"]  # pretrain and test-0 were reused, not rerun
    assert "reusing 2 succeeded step(s): pretrain, test-0" in out

    # the reused outputs are the first run's: same checkpoint bytes
    runs = tmp_path / "runs"
    step = lambda rid: next((runs / rid).glob("pretrain-h*"))  # noqa: E731  (step keys hold an input hash)
    ck = lambda rid: next((step(rid) / "outputs" / "artifacts" / "model").rglob("model.ckpt")).read_bytes()  # noqa: E731
    assert ck(first) == ck(second)
    assert main(["status", second, "--workdir", wd]) == 0
    status = capsys.readouterr().out
    assert f"{second} (debug): Succeeded" in status and "test-1 [ch4b]" in status

    # --from test: pretrain reused again, both test steps and the report rerun
    log.unlink()
    assert main(["retry", second, "--from", "test", "--workdir", wd]) == 0
    assert ledger(log) == ["report", "test ch4a", "test ch4b"]
    assert main(["list", "--workdir", wd]) == 0
    listed = capsys.readouterr().out
    assert f"(retry of {first})" in listed and f"(retry of {second})" in listed


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_its_outputs_load(tmp_path, monkeypatch, capsys):
    from lamflow.model.io.checkpoint import load_model
    from lamflow.workflows.spec import load_spec

    pipe = tmp_path / "quickstart.yaml"
    doc = yaml.safe_load((REPO / "templates" / "quickstart.yaml").read_text())
    doc["debug"] = {**doc.get("debug", {}), "workdir": str(tmp_path / "runs")}
    pipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # the template's paths are relative to templates/
    (tmp_path / "templates").mkdir()
    shutil.move(pipe, tmp_path / "templates" / "quickstart.yaml")
    pipe = tmp_path / "templates" / "quickstart.yaml"
    spec = load_spec(pipe)
    assert main(["submit", str(pipe), "--debug"]) == 0, capsys.readouterr().err
    rid = run_id(capsys.readouterr().out)
    wd = str(tmp_path / "runs")
    res = tmp_path / "results"
    assert main(["download", rid, "-o", str(res), "--workdir", wd]) == 0
    md = (res / "report.md").read_text()
    summary = json.loads((res / "summary.json").read_text())
    for line in md.splitlines():
        if line.startswith("!["):
            assert (res / line.split("](")[1].rstrip(")")).is_file()
    enabled = spec.stages.enabled()
    for stage in enabled:
        assert stage in summary, f"report has no {stage} section"
    models = {"pretrain": "model", "finetune": "model", "distill": "model", "compress": "model"}
    for stage in (s for s in enabled if s in models):
        got = tmp_path / f"dl-{stage}"
        assert main(["download", rid, "--stage", stage, "-o", str(got), "--workdir", wd]) == 0
        ckpts = sorted(got.rglob("*.ckpt"))
        assert ckpts, f"{stage}: no checkpoint downloaded"
        for c in ckpts:
            if c.parent.name != "checkpoints":
                load_model(c)
    capsys.readouterr()
    assert main(["status", rid, "--workdir", wd]) == 0
    status = capsys.readouterr().out
    assert f"{rid} (debug): Succeeded" in status and "meV" in status
    assert "x base" in status and "NVE stable" in status and "us/atom" in status
    assert_quickstart_learns(summary, md)


# What the quickstart must keep showing (issue 18). The targets are the issue's; the README gives
# the measured values, which sit well inside them (so noise does not fail this, a regression does).
FORCE_RATIO = 0.5  # force RMSE / RMS of the DFT forces (the dummy model's force RMSE)
ENERGY_RATIO = 1.0  # energy RMSE / the per-element-linear baseline's
SPEEDUP = 1.5  # compression, on a shared neighbour list (the target); measured 1.62-1.85x at load 2-6


def assert_quickstart_learns(summary: dict, md: str) -> None:
    from lamflow.model.tasks.report import NOT_BETTER

    tuned = list(summary["test"].values())
    models = tuned + [summary["student_test"]]
    for t in models:  # shown with -s: the figures README.md quotes
        print(t["role"], t["system"], {k: round(v["ratio"], 3) for k, v in t["normalised"].items()},
              "zero-shot" if t.get("zero_shot") else "", t.get("zero_shot") or "", t["stability"]["stable"], "stable")
    print("compress", summary["compress"]["speedup"], summary["compress"]["natoms"], "flags", summary.get("flags"))
    assert {t["role"] for t in models} == {"fine-tuned", "student"}
    for h, m in summary["pretrain"]["heads"].items():  # the pretraining heads, on their validation frames
        assert m["normalised"] and all(n["ratio"] < 1 for n in m["normalised"].values()), (h, m)
    for t in models:
        n = t["normalised"]
        who = f"{t['role']} {t['system']}"
        assert n["rmse_f"]["ratio"] <= FORCE_RATIO, (who, n)
        assert n["rmse_e_per_atom"]["ratio"] < ENERGY_RATIO, (who, n)
        assert t["stability"]["total"] == 2 and t["efficiency"]["natoms"] >= 1000, who
    for t in tuned:  # fine-tuning beats zero-shot on the system it trained on
        assert t["split"] == "test"
        for k in ("rmse_e_per_atom", "rmse_f"):
            assert t["model"][k] < t["zero_shot"][k], (t["system"], k, t["model"], t["zero_shot"])
    k = summary["compress"]
    assert k["natoms"] >= 500 and k["speedup"] >= SPEEDUP, k
    assert k["max_abs_df"] < 1e-3 and k["max_abs_de_per_atom"] < 1e-4, k  # unchanged accuracy
    assert not [f for f in summary.get("flags", []) if NOT_BETTER in f or "zero-shot" in f], summary["flags"]
    assert "better than baseline" in md and NOT_BETTER not in md
