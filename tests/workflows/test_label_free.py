"""Label-free structures (extxyz without energies, POSCAR, CIF) as denoise heads of the pipeline's
pretrain stage: the spec's checks (one line each, before any training) and a debug-mode run
with one energy head and one label-free denoise head, then fine-tuning from that model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import TINY, data_path

from lamflow.workflows.cli import main
from lamflow.workflows.spec import SpecError, check_spec, load_spec

NOISE = {"loss": {"noise": 0.2, "noise_ratio": 0.5, "mask_ratio": 0.0}, "fitting_net": {"neuron": [8], "seed": 3}}


def write_structures(root: Path, nframes: int = 6) -> dict[str, Path]:
    """CH4 frames without labels: an extxyz of several frames, one POSCAR, one CIF."""
    import ase
    import ase.io

    from lamflow.model.data.systems import load_systems

    s = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    frames = [ase.Atoms([["H", "C"][t] for t in s.atype], positions=s.coord[k], cell=s.box[k], pbc=True)
              for k in range(nframes)]
    root.mkdir(parents=True, exist_ok=True)
    ase.io.write(root / "ch4.extxyz", frames, format="extxyz")  # no energies, no forces
    ase.io.write(root / "POSCAR", frames[0], format="vasp")
    ase.io.write(root / "ch4.cif", frames[1], format="cif")
    return {"extxyz": root / "ch4.extxyz", "poscar": root / "POSCAR", "cif": root / "ch4.cif"}


def pipeline(tmp_path: Path, structures: dict, *, denoise=None, finetune=True, **extra) -> dict:
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    stages = {"pretrain": {"datasets": ["ch4", "crystals"], "denoise": {"crystals": NOISE} if denoise is None else denoise,
                           **TINY}}
    if finetune:
        stages["finetune"] = {"systems": ["ch4"], "training": {"numb_steps": 2, "disp_freq": 1, "save_freq": 2, "seed": 1}}
    doc = {"name": "denoise", "type_map": ["H", "C"],
           "datasets": {"ch4": ch4, "crystals": {"train": structures, "label_free": True}},
           "stages": stages, "debug": {"workdir": str(tmp_path / "runs")}}
    for k, v in extra.items():
        doc[k] = v
    return doc


def problems_of(tmp_path: Path, doc: dict) -> list[str]:
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        spec = load_spec(p)
    except SpecError as e:
        return e.problems
    return check_spec(spec)


@pytest.fixture
def structs(tmp_path):
    return write_structures(tmp_path / "structures")


def test_label_free_structures_of_three_formats_pass_validation(tmp_path, structs):
    doc = pipeline(tmp_path, [str(tmp_path / "structures" / "*.extxyz")])  # a glob
    assert problems_of(tmp_path, doc) == []
    spec = load_spec(tmp_path / "pipe.yaml")
    assert spec.datasets["crystals"].train == [str(structs["extxyz"])] and spec.datasets["crystals"].fmt == "extxyz"
    for fmt in ("poscar", "cif"):
        assert problems_of(tmp_path, pipeline(tmp_path, [str(structs[fmt])])) == [], fmt
    doc = pipeline(tmp_path, [str(structs["cif"])], finetune=False)
    doc["stages"].update(clean={}, test={"stability": None, "efficiency": None})
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(doc))
    spec = load_spec(tmp_path / "pipe.yaml")
    assert spec.test_systems == ["ch4"] and spec.clean_datasets == ["ch4"]  # label-free: never tested or cleaned by default


def test_label_free_misuse_is_one_line_each(tmp_path, structs):
    files = [str(structs["extxyz"])]
    src = str(tmp_path / "pipe.yaml")
    got = problems_of(tmp_path, pipeline(tmp_path, files, denoise={}))
    assert got == [f"{src}: stages.pretrain.datasets[1]: dataset 'crystals' is label-free (datasets.crystals.label_free: "
                   "no energies or forces): it can only be a denoise head; name it in stages.pretrain.denoise"]
    doc = pipeline(tmp_path, files)
    doc["stages"]["finetune"]["systems"] = ["crystals"]
    doc["stages"]["test"] = {"systems": ["crystals"], "zero_shot": False}
    doc["stages"]["clean"] = {"datasets": ["crystals"]}
    got = problems_of(tmp_path, doc)
    assert any(ln.startswith(f"{src}: stages.finetune.systems[0]: dataset 'crystals' is label-free")
               and "fine-tuning needs labels" in ln for ln in got), got
    assert any(ln.startswith(f"{src}: stages.clean.datasets[0]: dataset 'crystals' is label-free") for ln in got), got
    assert any(ln.startswith(f"{src}: stages.test.systems[0]") for ln in got), got
    got = problems_of(tmp_path, pipeline(tmp_path, files, denoise=["ch4x"]))
    assert any("stages.pretrain.denoise.ch4x: not one of stages.pretrain.datasets" in ln for ln in got), got
    got = problems_of(tmp_path, pipeline(tmp_path, files, denoise={"crystals": {"loss": {"noise": -1}}}))
    assert any(ln.startswith(f"{src}: stages.pretrain.denoise.crystals.loss.noise:") for ln in got), got
    got = problems_of(tmp_path, pipeline(tmp_path, files, denoise=["crystals"]))  # default mask_ratio 0.15, se_e2_a
    assert got == [f"{src}: stages.pretrain.denoise.crystals.loss.mask_ratio: mask_ratio > 0 needs a mixed-type descriptor "
                   "(se_atten, dpa2, dpa3); se_e2_a sorts neighbours by element and cannot hide one (set mask_ratio: 0)"], got
    doc = pipeline(tmp_path, files)
    doc["stages"]["pretrain"]["datasets"] = ["crystals"]  # denoise only: fine-tuning starts from the descriptor
    doc["stages"]["test"] = {}
    assert problems_of(tmp_path, doc) == [f"{src}: stages.test.zero_shot: every pretrain head is a denoise head "
                                          "(no energy head to re-fit); set zero_shot: false"]


def test_label_free_bad_files_name_the_file_before_training(tmp_path, structs):
    src = str(tmp_path / "pipe.yaml")
    missing = str(tmp_path / "structures" / "gone.cif")
    assert problems_of(tmp_path, pipeline(tmp_path, [missing])) == [
        f"{src}: datasets.crystals.train[0]: no such file or directory: {missing}"]
    assert problems_of(tmp_path, pipeline(tmp_path, [str(tmp_path / "nothing" / "*.cif")])) == [
        f"{src}: datasets.crystals.train[0]: no file matches {tmp_path / 'nothing' / '*.cif'}"]
    bad = tmp_path / "structures" / "broken.cif"
    bad.write_text("data_x\n_cell_length_a oops\n")
    got = problems_of(tmp_path, pipeline(tmp_path, [str(bad)]))
    assert len(got) == 1 and got[0].startswith(f"{src}: datasets.crystals.train[0]: {bad}: "), got  # parse error or empty
    water = load_water_frame()
    import ase.io

    ase.io.write(tmp_path / "structures" / "water.extxyz", [water], format="extxyz")
    got = problems_of(tmp_path, pipeline(tmp_path, [str(tmp_path / "structures" / "water.extxyz")]))
    assert len(got) == 1 and "water.extxyz: element(s) O not in the model type map ['H', 'C']" in got[0], got
    assert got[0].startswith(f"{src}: datasets.crystals.train[0]: "), got


def load_water_frame():
    import ase

    from lamflow.model.data.systems import load_systems

    w = load_systems(str(data_path("water_h2o", "valid")), ["O", "H"])[0]
    return ase.Atoms([["O", "H"][t] for t in w.atype], positions=w.coord[0], cell=w.box[0], pbc=True)


@pytest.mark.slow
def test_pretrain_with_energy_and_label_free_denoise_head_then_finetune(tmp_path, structs, capsys):
    from lamflow.model.io.checkpoint import read_checkpoint

    doc = pipeline(tmp_path, [str(structs["extxyz"]), str(structs["poscar"])])
    doc["datasets"]["crystals"].update(fmt="ase", valid=str(structs["cif"]))  # all through ASE: one format per dataset
    doc["stages"]["pretrain"]["training"] = {**TINY["training"], "numb_steps": 6, "model_prob": {"ch4": 1, "crystals": 2}}
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(doc))
    rc = main(["submit", str(pipe), "--debug"])
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]
    rid = next(ln.split()[1].rstrip(":") for ln in printed.out.splitlines() if ln.startswith("run "))
    wd = str(tmp_path / "runs")
    got = tmp_path / "dl"
    assert main(["download", rid, "--stage", "pretrain", "-o", str(got / "pre"), "--workdir", wd]) == 0
    assert main(["download", rid, "--stage", "finetune", "-o", str(got / "ft"), "--workdir", wd]) == 0
    ckpt = next(p for p in (got / "pre").rglob("model.ckpt") if p.parent.name != "checkpoints")
    payload = read_checkpoint(ckpt)
    branches = payload["config"]["branches"]
    assert payload["kind"] == "multitask"
    assert {n: b["task"] for n, b in branches.items()} == {"ch4": "ener", "crystals": "denoise"}
    rows = list(csv.DictReader(next((got / "pre").rglob("lcurve.csv")).read_text().splitlines()))
    coord = [float(r["crystals:rmse_coord_val"]) for r in rows]  # the denoise loss, on the CIF at every display step
    assert len(coord) == len(rows) >= 3 and all(0 < c < 0.35 for c in coord), coord  # 0.2 A noise: rmse about 0.2
    assert any(r["task"] == "crystals" and math.isfinite(float(r["rmse_coord_trn"])) for r in rows)
    summary = json.loads(next((got / "pre").rglob("summary.json")).read_text())
    assert math.isfinite(summary["heads"]["crystals"]["rmse_coord"]) and "rmse_f" in summary["heads"]["ch4"]
    ft = [p for p in (got / "ft").rglob("model.ckpt") if p.parent.name != "checkpoints"]
    assert ft, "the fine-tune step wrote no model"
    ft_payload = read_checkpoint(ft[0])
    assert ft_payload["kind"] == "energy"
    tuned = ft_payload["state_dict"]
    pre_desc = {k: v for k, v in payload["state_dict"].items() if k.startswith("descriptor.") and v.is_floating_point()}
    assert pre_desc and set(pre_desc) <= set(tuned)
    # two fine-tuning steps move the pretrained descriptor only a little (a fresh one would differ by O(1))
    scale = max(float(v.abs().max()) for v in pre_desc.values())
    moved = max(float((tuned[k].double() - v.double()).abs().max()) for k, v in pre_desc.items())
    assert 0 <= moved < 0.05 * scale, (moved, scale)
