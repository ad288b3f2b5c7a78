"""Reports: the Markdown tables hold the numbers of metrics.json, images are linked by paths that
resolve from the report's folder, `lamflow test` writes per-system parity plots, a bar chart and
the zero-shot comparison, and a run report gathers stage folders."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path

from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.evaluate import transferability
from lamflow.model.tasks.report import Section, Table, gather_report, metrics_table, meV, write_markdown
from lamflow.workflows.cli import main


def tiny(type_map, seed):
    return EnergyModel(ModelConfig.model_validate({
        "type_map": type_map,
        "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [4, 4, 4][: len(type_map)],
                       "neuron": [4, 8], "axis_neuron": 2, "seed": seed},
        "fitting_net": {"neuron": [8], "seed": seed}}))


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    save_model(tiny(["H", "C", "O"], 1), tmp / "tuned.ckpt")
    save_model(tiny(["H", "C"], 2), tmp / "pre.ckpt")
    systems = [str(data_path("ch4_pbe", "valid")), str(data_path("chon_nopbc", "test_ood"))]
    assert main(["test", "-m", str(tmp / "tuned.ckpt"), "-s", *systems, "--zero-shot", str(tmp / "pre.ckpt"),
                 "-o", str(tmp / "test")]) == 0
    return tmp


def image_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_markdown_table_holds_the_rmse_values_of_metrics_json(tested):
    out = tested / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    md = (out / "report.md").read_text()
    shorts = {str(data_path("ch4_pbe", "valid")): "ch4_pbe/valid",
              str(data_path("chon_nopbc", "test_ood", "C4H3O1")): "chon_nopbc/test_ood/C4H3O1"}
    assert set(metrics["systems"]) == set(shorts)
    for name, m in metrics["systems"].items():
        short = shorts[name]
        row = f"| {short} | {m['nframes']} | {meV(m['rmse_e_per_atom'])} | {meV(m['mae_e_per_atom'])} | {meV(m['rmse_f'])} |"
        assert row in md, (row, md)
    o = metrics["overall"]
    assert f"| **overall** | {o['nframes']} | {meV(o['rmse_e_per_atom'])} |" in md
    assert meV(o["rmse_f"]) == f"{1000 * o['rmse_f']:.2f}"


def test_every_image_in_the_report_exists_relative_to_it(tested):
    out = tested / "test"
    links = image_links((out / "report.md").read_text())
    assert "parity.png" in links and "bars.png" in links and "zero_shot/parity.png" in links
    assert sum(link.startswith("parity/") for link in links) == 2  # one parity plot per system
    for link in links:
        assert not Path(link).is_absolute() and (out / link).stat().st_size > 1000, link


def test_zero_shot_comparison_skips_systems_with_unknown_elements(tested):
    out = tested / "test"
    cmp = json.loads((out / "compare.json").read_text())
    zs, tuned = cmp["first"], cmp["second"]
    ch4 = str(data_path("ch4_pbe", "valid"))
    assert list(zs["systems"]) == [ch4] and zs["skipped"] == [str(data_path("chon_nopbc", "test_ood", "C4H3O1"))]
    md = (out / "report.md").read_text()
    zs_c, tuned_c = zs["systems"][ch4], tuned["systems"][ch4]
    row = (f"| ch4_pbe/valid | 60 | {meV(zs_c['rmse_e_per_atom'])} | {meV(tuned_c['rmse_e_per_atom'])} | "
           f"{meV(zs_c['rmse_f'])} | {meV(tuned_c['rmse_f'])} |")
    assert row in md, md
    # overall rows compare the same frames: the tuned model's overall is over the covered system only
    assert tuned["overall"]["nframes"] == 60 and tuned["overall"]["rmse_f"] == tuned["systems"][ch4]["rmse_f"]
    assert f"| **overall** | 60 | {meV(zs['overall']['rmse_e_per_atom'])} | {meV(tuned['overall']['rmse_e_per_atom'])} |" in md
    assert "Not covered by the pretrained type map: chon_nopbc/test_ood/C4H3O1" in md


def test_zero_shot_refit_matches_a_manual_bias_fit(tested, tmp_path):
    from lamflow.model.data.systems import load_systems
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.nn.infer import evaluate_system

    pre = load_model(tested / "pre.ckpt")
    s = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    res = transferability(load_model(tested / "tuned.ckpt"), [str(data_path("ch4_pbe", "valid"))], tmp_path,
                          zero_shot=pre, log=lambda *a: None)
    e = evaluate_system(pre, s)["energy"]
    shift = np.mean(s.energy - e)  # one composition: the least-squares bias change is the mean error
    expect = np.sqrt(np.mean(((e + shift - s.energy) / s.natoms) ** 2))
    assert res.zero_shot["overall"]["rmse_e_per_atom"] == pytest.approx(expect, rel=1e-8)


def test_gather_report_collects_stage_folders(tested, tmp_path):
    assert main(["clean", str(data_path("ch4_pbe", "valid")), "-o", str(tmp_path / "clean"),
                 "--pretrained", str(tested / "pre.ckpt")]) == 0
    path = gather_report({"clean": tmp_path / "clean", "test-ch4": tested / "test", "distill": tmp_path / "none"},
                         tmp_path / "run" / "report.md", intro="A tiny run.")
    md = path.read_text()
    assert md.startswith("# lamflow run report") and "## clean" in md and "## test-ch4" in md
    assert "Kept **60** of 60 frames" in md and "No outputs found" in md
    zs = json.loads((tmp_path / "clean" / "zero_shot.json").read_text())["overall"]
    assert meV(zs["rmse_f"]) in md
    for link in image_links(md):
        assert link.startswith("../") and (path.parent / link).is_file(), link


def test_write_markdown_sections_tables_and_relative_images(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    t = metrics_table({"systems": {"/d/x/train": {"nframes": 3, "rmse_f": 0.0123}}, "overall": {"nframes": 3, "rmse_f": 0.0123}})
    sec = [Section("Test", "some text", [t, Table(["k", "v"], [["a|b", 1]])], [tmp_path / "plots" / "a.png"])]
    md = write_markdown(sec, tmp_path / "r" / "report.md", title="T").read_text()
    assert md.splitlines()[0] == "# T" and "## Test" in md and "some text" in md
    assert "| system | frames | F RMSE (meV/A) |" in md and "| x/train | 3 | 12.30 |" in md
    assert "| a\\|b | 1 |" in md and "![a](../plots/a.png)" in md


def test_lamflow_test_report_flags_an_untrained_model_against_the_baseline(tested):
    from lamflow.model.tasks.report import NOT_BETTER

    out = tested / "test"
    md = (out / "report.md").read_text()
    base = json.loads((out / "baseline.json").read_text())
    assert "## Against the composition-only baseline" in md and f"is {NOT_BETTER}" in md
    assert meV(base["overall"]["rmse_f"]) in md  # the dummy's force RMSE (= RMS of the DFT forces) is shown
