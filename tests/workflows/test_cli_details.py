"""Small things a new user meets first: `lamflow --version`; `lamflow test --zero-shot` on a
multi-task pretrained model picks its head with --branch; the test step prints a table, not a
JSON blob; the commands in the templates' comments name files that exist where they say to run."""

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, data_path

from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.multitask import EnergyHeadConfig, MultiTaskModel, MultiTaskModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.ops.test import summary_table
from lamflow.workflows.cli import build_parser, main

DESC = {"type": "se_atten", "rcut": 4.0, "sel": 12, "neuron": [4, 8], "axis_neuron": 2, "tebd_dim": 4, "attn": 8,
        "attn_layer": 1, "seed": 1}


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lamflow {version('lamflow')}"


def test_zero_shot_of_a_multitask_model_needs_and_takes_a_branch(tmp_path, capsys):
    cfg = MultiTaskModelConfig(type_map=["H", "C", "O"], descriptor=DESC,
                               branches={"water": EnergyHeadConfig(type_map=["H", "O"], fitting_net={"neuron": [8], "seed": 2}),
                                         "ch4": EnergyHeadConfig(type_map=["H", "C"], fitting_net={"neuron": [8], "seed": 3})})
    pre = save_model(MultiTaskModel(cfg), tmp_path / "pre.ckpt")
    tuned = save_model(EnergyModel(ModelConfig(type_map=["H", "C"], descriptor=DESC, fitting_net={"neuron": [8], "seed": 4})),
                       tmp_path / "tuned.ckpt")
    args = ["test", "-m", str(tuned), "-s", str(data_path("ch4_pbe", "valid")), "--zero-shot", str(pre)]
    assert main(args + ["-o", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err.strip() == (f"lamflow test: error: {pre}: a multi-task model: choose a branch "
                                               "(water, ch4) with --branch")
    assert main(args + ["--branch", "nope", "-o", str(tmp_path / "b")]) == 1
    assert "no branch 'nope' in this model (branches: water, ch4)" in capsys.readouterr().err
    assert main(args + ["--branch", "ch4", "-o", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "E zero-shot" in out and "overall" in out
    zs = json.loads((tmp_path / "c" / "zero_shot" / "metrics.json").read_text())
    assert zs["overall"]["nframes"] == 60 and zs["overall"]["rmse_f"] > 0
    assert main(["test", "-m", str(tuned), "-s", str(data_path("ch4_pbe", "valid")), "--branch", "ch4",
                 "-o", str(tmp_path / "d")]) == 1
    assert "--branch ch4: neither -m nor --zero-shot is a multi-task model" in capsys.readouterr().err


def test_test_step_prints_an_aligned_table_in_meV():
    summary = {"system": "water", "nframes": 8,
               "model": {"rmse_e_per_atom": 0.00591, "mae_e_per_atom": 0.004, "rmse_f": 0.2904, "mae_f": 0.2},
               "zero_shot": {"rmse_e_per_atom": 0.0031, "rmse_f": 0.825}}
    lines = summary_table(summary)
    assert lines[0] == "test water: 8 frames" and not any("{" in line for line in lines)
    head, model, zero = lines[1:]
    assert head.split()[:3] == ["E", "rmse", "meV/atom"] and "F rmse meV/A" in head
    assert model.split() == ["model", "5.91", "4.00", "290.40", "200.00"]
    assert zero.split() == ["zero-shot", "3.10", "-", "825.00", "-"]
    assert len({len(line) for line in lines[1:]}) == 1  # columns line up


def commented_commands(path: Path) -> list[list[str]]:
    """`lamflow ...` (or `torchrun ... -m lamflow.workflows.cli ...`) lines of a template's comment block."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"#\s{2,}(?:torchrun .*?-m lamflow\.workflows\.cli|lamflow)\s+(.*)", line)
        if m:
            out.append(shlex.split(m.group(1).split("  #")[0]))
    return out


@pytest.mark.parametrize("template", sorted(p.name for p in (REPO / "templates").glob("*.yaml")))
def test_template_comment_commands_parse_and_name_existing_inputs(template):
    """Run from the repository root (as the comments say), every config a command reads exists."""
    cmds = commented_commands(REPO / "templates" / template)
    parser = build_parser()
    for argv in cmds:
        args = parser.parse_args(argv)
        for key in ("config", "spec", "pipeline"):
            value = getattr(args, key, None)
            if value is not None:
                assert (REPO / value).is_file(), \
                    f"{template}: `lamflow {' '.join(argv)}`: {value} does not exist from the repo root"
    if template == "multitask-pretrain.yaml":
        assert [a[0] for a in cmds] == ["train", "train", "inspect", "train"]
        assert (REPO / cmds[-1][1]).is_file()
