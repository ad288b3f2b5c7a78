"""`lamflow inspect`: type map, branches, descriptor and parameter counts; type-embedding PCA and
periodic-table coverage PNGs; a clear error for a descriptor without type embedding."""

import pytest

from lamflow.model.checkpoint import save_model
from lamflow.model.config import ModelConfig
from lamflow.model.denoise import MASK
from lamflow.model.multitask import DenoiseHeadConfig, EnergyHeadConfig, MultiTaskModel, MultiTaskModelConfig
from lamflow.model.potential import EnergyModel
from lamflow.workflows.cli import main
from lamflow.workflows.cmd_inspect import table_position

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
    assert out[2] == "branches (3): water (ener: O H); si (ener: Si); noise (denoise: O H C Si Pb)"
    assert out[3].startswith("descriptor: se_atten  rcut 4.0  sel 40  neuron [4, 8]  axis_neuron 2  tebd_dim 4")
    rows = {line.split()[0] + (line.split()[1] if line.split()[0] == "head" else ""): line for line in out[5:] if line.strip()}
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
