"""`lamflow inspect`: type map, trained-on elements, branches, descriptor and parameter counts (for
compressed models too); type-embedding PCA and periodic-table coverage PNGs; a clear error for a
descriptor without type embedding. Training records the elements of its data in the checkpoint,
and coverage (inspect, clean) tells "trained on" from "in the type map"."""

import pytest
from conftest import data_path

from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import MASK, ModelConfig
from lamflow.model.nn.multitask import DenoiseHeadConfig, EnergyHeadConfig, MultiTaskModel, MultiTaskModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.clean import CleanConfig, clean
from lamflow.model.tasks.compress import compress
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import train
from lamflow.workflows.cli import main
from lamflow.workflows.cli.tools.inspect import table_position

ELEMENTS = ["O", "H", "C", "Si", "Pb"]


@pytest.fixture
def multitask_ckpt(tmp_path):
    desc = {"type": "se_atten", "rcut": 4.0, "sel": 40, "neuron": [4, 8], "axis_neuron": 2, "tebd_dim": 4, "attn": 8,
            "attn_layer": 1, "seed": 1}
    cfg = MultiTaskModelConfig(
        type_map=ELEMENTS + [MASK], descriptor=desc,
        branches={"water": EnergyHeadConfig(type_map=["O", "H"], fitting_net={"neuron": [8], "seed": 2}),
                  "si": EnergyHeadConfig(type_map=["Si"], fitting_net={"neuron": [8], "seed": 3}),
                  "noise": DenoiseHeadConfig(type_map=ELEMENTS, fitting_net={"neuron": [8], "seed": 4})})
    return save_model(MultiTaskModel(cfg), tmp_path / "mt.ckpt")


def test_inspect_prints_type_map_branches_and_writes_both_pngs(multitask_ckpt, tmp_path, capsys):
    pca, cov = tmp_path / "pca.png", tmp_path / "plots" / "coverage.png"
    assert main(["inspect", str(multitask_ckpt), "--type-embedding-pca", str(pca), "--coverage", str(cov)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "type map (5): O H C Si Pb  (+ MASK token for denoising)"
    assert out[2] == "trained on: not recorded in this checkpoint (written before lamflow recorded it)"
    assert out[3] == "branches (3): water (ener: O H); si (ener: Si); noise (denoise: O H C Si Pb)"
    assert out[4].startswith("descriptor: se_atten  rcut 4.0  sel 40  neuron [4, 8]  axis_neuron 2  tebd_dim 4")
    rows = {line.split()[0] + (line.split()[1] if line.split()[0] == "head" else ""): line for line in out[6:] if line.strip()}
    assert "type_embedding" in rows and "headwater" in rows and "headnoise" in rows
    total = int(rows["total"].split()[-1].replace(",", ""))
    parts = [int(rows[k].split()[-1].replace(",", "")) for k in ("descriptor", "headwater", "headsi", "headnoise")]
    assert total == sum(parts) > 0
    assert pca.stat().st_size > 5000 and cov.stat().st_size > 5000
    assert pca.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_pca_of_a_model_without_type_embedding_fails_clearly(tmp_path, capsys):
    cfg = ModelConfig(type_map=["H", "C"], descriptor={"type": "se_e2_a", "rcut": 4.0, "sel": [8, 4], "neuron": [4, 8],
                                                       "axis_neuron": 2}, fitting_net={"neuron": [8]})
    ckpt = save_model(EnergyModel(cfg), tmp_path / "se_a.ckpt")
    assert main(["inspect", str(ckpt), "--coverage", str(tmp_path / "cov.png")]) == 0
    assert "type map (2): H C" in capsys.readouterr().out and (tmp_path / "cov.png").is_file()
    assert main(["inspect", str(ckpt), "--type-embedding-pca", str(tmp_path / "pca.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"lamflow inspect: error: {ckpt}: descriptor se_e2_a has no type embedding (one network per element); "
                   "--type-embedding-pca needs a mixed-type descriptor such as se_atten or dpa2")
    assert not (tmp_path / "pca.png").exists()


def test_periodic_table_places_every_element_in_its_own_cell():
    cells = [table_position(z) for z in range(1, 119)]
    assert len(set(cells)) == 118
    assert table_position(6) == (2, 14) and table_position(14) == (3, 14) and table_position(82) == (6, 14)
    assert table_position(57) == (9, 3) and table_position(103) == (10, 17) and table_position(118) == (7, 18)


def test_training_records_trained_elements_and_coverage_tells_them_from_the_type_map(tmp_path, capsys):
    """A model with type map H C O trained on CH4 only: O is in the type map but untrained, which
    inspect prints and draws, its compressed form keeps, and clean reports for water data."""
    cfg = TrainConfig.model_validate({
        "model": {"type_map": ["H", "C", "O"],
                  "descriptor": {"type": "se_e2_a", "rcut": 4.0, "sel": [24, 4, 12], "neuron": [4, 8], "axis_neuron": 2,
                                 "seed": 1},
                  "fitting_net": {"neuron": [8], "seed": 1}},
        "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 5},
        "training": {"training_data": {"systems": str(data_path("ch4_pbe", "valid")), "batch_size": 4}, "numb_steps": 2,
                     "seed": 1, "disp_freq": 1, "save_freq": 2}})
    ckpt = train(cfg, tmp_path / "m", log=lambda *a: None).checkpoint
    assert read_checkpoint(ckpt)["trained_elements"] == ["H", "C"]
    cov = tmp_path / "cov.png"
    assert main(["inspect", str(ckpt), "--coverage", str(cov)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "type map (3): H C O" and out[2] == "trained on (2): H C  (in the type map only, untrained: O)"
    assert cov.stat().st_size > 5000
    # a compressed model: inspect no longer crashes, shows the tables and keeps the trained-on record
    comp = compress(ckpt, tmp_path / "c.ckpt", min_nbor_dist=0.9, stride=0.05, log=lambda *a: None).checkpoint
    assert main(["inspect", str(comp)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(kind compressed, float64)" in out[0] and out[2] == "trained on (2): H C  (in the type map only, untrained: O)"
    assert out[3].startswith("descriptor: se_e2_a  rcut 4.0  sel [24, 4, 12]")
    assert out[4].startswith("compressed: 9 tables, ") and "min_nbor_dist 0.9000 A" in out[4]
    rows = {line.rsplit(None, 1)[0].strip(): int(line.split()[-1].replace(",", "")) for line in out[6:]}
    assert rows["tables (coefficients)"] > 0 and rows["total"] == rows["tables (coefficients)"] + rows["fitting"]
    # clean with water data: O is covered by the type map, but the model was never trained on it
    res = clean([str(data_path("water_h2o_mini", "valid"))], tmp_path / "clean", CleanConfig(zero_shot=False),
                pretrained=str(ckpt), log=lambda *a: None)
    c = res.report["coverage"]
    assert c["uncovered"] == [] and c["trained_elements"] == ["H", "C"] and c["untrained"] == ["O"]
    report = (tmp_path / "clean" / "report.md").read_text()
    assert "Element(s) O are in the pretrained type map but not in its training data" in report


def test_multitask_training_records_the_elements_of_each_branch(tmp_path, capsys):
    """Pretraining on water and CH4 with type map H C O Si: Si untrained; the water head never saw C."""
    from lamflow.model.training.multitask import train_multitask
    from lamflow.model.training.multitask_config import MultiTaskTrainConfig

    branch = lambda seed: {"type_map": "tm", "descriptor": "d", "fitting_net": {"neuron": [8], "seed": seed}}  # noqa: E731
    data = lambda p: {"training_data": {"systems": str(data_path(*p)), "batch_size": 1}}  # noqa: E731
    cfg = MultiTaskTrainConfig.model_validate({
        "model": {"shared_dict": {"tm": ["H", "C", "O", "Si"],
                                  "d": {"type": "se_e2_a", "rcut": 3.0, "sel": [40, 4, 20, 4], "neuron": [4], "axis_neuron": 2,
                                        "seed": 1}},
                  "model_dict": {"water": branch(2), "ch4": branch(3)}},
        "training": {"data_dict": {"water": data(("water_h2o_mini", "valid")), "ch4": data(("ch4_pbe", "valid"))},
                     "numb_steps": 2, "disp_freq": 1, "save_freq": 2, "seed": 1}})
    ckpt = train_multitask(cfg, tmp_path / "mt", log=lambda *a: None).checkpoint
    payload = read_checkpoint(ckpt)
    assert payload["trained_elements"] == ["H", "C", "O"]
    assert payload["trained_elements_by_branch"] == {"water": ["H", "O"], "ch4": ["H", "C"]}
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "trained on (3): H C O  (in the type map only, untrained: Si)"
    assert out[3] == "  by branch: water: H O; ch4: H C"
    # clean's coverage through the water head: C is in the type map, but that head never saw it
    res = clean([str(data_path("ch4_pbe", "valid"))], tmp_path / "clean", CleanConfig(zero_shot=False), pretrained=str(ckpt),
                branch="water", log=lambda *a: None)
    assert res.report["coverage"]["untrained"] == ["C"] and res.report["coverage"]["uncovered"] == []
