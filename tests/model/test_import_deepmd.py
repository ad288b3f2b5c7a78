"""Importing deepmd-kit 3.x PyTorch checkpoints (se_e2_a, se_atten / DPA-1, se_atten_v2, DPA-2,
DPA-3, multi-task, the shared fitting with a dataset encoding): tiny models trained by the reference deepmd-kit
(`dp --pt train` in its own venv, see deepmd_helpers.py) predict, once imported, the energies,
forces and virials that `deepmd.infer.DeepPot` gives for the same checkpoint, to 1e-8 (float64),
on periodic (ch4_pbe) and non-periodic (chon_nopbc, two compositions) frames. Unsupported
options fail with one line naming them; reading a checkpoint never runs code from it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path
from deepmd_helpers import DeepmdUnavailable, deeppot_eval, dp_train, ensure_deepmd_venv, load_frames, train_input

from lamflow.model.errors import CheckpointError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.deepmd_import import branches, convert, import_deepmd, read_deepmd
from lamflow.model.nn.infer import evaluate
from lamflow.model.training.pretrained import read_model as load_any
from lamflow.workflows.cli import main

TYPE_MAP = ["H", "C", "O"]
# (atol eV, eV/A; rtol): float64 to 1e-8; float32 to its round-off (our out_bias is kept in the model's
# precision, deepmd-kit's in float64: ~1e-9 of a total energy of -1e4 eV)
TOL = {"float64": (1e-8, 0.0), "float32": (1e-5, 1e-7)}
COMMON = {"rcut": 6.0, "rcut_smth": 0.5, "seed": 1}
ATTEN = {**COMMON, "type": "se_atten", "sel": 24, "neuron": [4, 8], "axis_neuron": 4, "attn": 8, "tebd_dim": 4}
REPFORMER = {"rcut": 4.0, "rcut_smth": 3.5, "nsel": 12, "nlayers": 2, "g1_dim": 8, "g2_dim": 4, "axis_neuron": 2,
             "attn1_hidden": 4, "attn1_nhead": 2, "attn2_hidden": 4, "attn2_nhead": 2, "update_g1_has_attn": True,
             "update_g2_has_g1g1": True, "update_g2_has_attn": True}
SINGLE = {  # name -> descriptor; every variant the importer maps, each trained for a few steps
    "se_e2_a": {**COMMON, "type": "se_e2_a", "sel": [12, 6, 6], "neuron": [4, 8], "axis_neuron": 4,
                "type_one_side": False, "resnet_dt": True},
    "se_e2_a_one_side": {**COMMON, "type": "se_e2_a", "sel": [12, 6, 6], "neuron": [4, 8, 16], "axis_neuron": 4,
                         "type_one_side": True},
    "se_e2_a_float32": {**COMMON, "type": "se_e2_a", "sel": [12, 6, 6], "neuron": [4, 8], "axis_neuron": 4,
                        "precision": "float32"},  # with a float64 fitting net
    "se_atten": {**ATTEN, "attn_layer": 2, "smooth_type_embedding": False},
    "se_atten_smooth": {**ATTEN, "attn_layer": 2, "smooth_type_embedding": True, "type_one_side": True},
    "se_atten_v2": {**ATTEN, "type": "se_atten_v2", "attn_layer": 1},
    "dpa2": {  # three-body repinit, every repformer update, residual combination
        "type": "dpa2", "precision": "float64", "smooth": True, "seed": 1, "add_tebd_to_repinit_out": True,
        "repinit": {"rcut": 6.0, "rcut_smth": 0.5, "nsel": 24, "neuron": [4, 8], "axis_neuron": 4, "tebd_dim": 4,
                    "use_three_body": True, "three_body_neuron": [2, 4], "three_body_rcut": 4.0,
                    "three_body_rcut_smth": 3.5, "three_body_sel": 12},
        "repformer": {**REPFORMER, "attn2_has_gate": True, "update_h2": True, "update_style": "res_residual",
                      "update_residual": 0.01},
    },
    "dpa3": {  # parallel updates, linear angle compression, two edge-message heads, tebd in the output
        "type": "dpa3", "precision": "float64", "seed": 1, "concat_output_tebd": True, "use_tebd_bias": True,
        "repflow": {"n_dim": 8, "e_dim": 6, "a_dim": 4, "nlayers": 2, "e_rcut": 4.0, "e_rcut_smth": 0.5, "e_sel": 16,
                    "a_rcut": 3.0, "a_rcut_smth": 2.5, "a_sel": 8, "axis_neuron": 2, "a_compress_rate": 1,
                    "n_multi_edge_message": 2, "update_residual_init": "norm", "update_residual": 0.2},
    },
}
# the DPA-3.1 multi-task layout: one descriptor and one fitting net shared by both branches, the
# fitting told the branch apart by a dataset encoding (dim_case_embd = number of branches)
DPA3_SHARED = {
    "type": "dpa3", "precision": "float64", "seed": 1, "activation_function": "custom_silu:3.0",
    "repflow": {"n_dim": 12, "e_dim": 8, "a_dim": 4, "nlayers": 2, "e_rcut": 4.0, "e_rcut_smth": 3.5, "e_sel": 24,
                "a_rcut": 3.0, "a_rcut_smth": 2.5, "a_sel": 12, "axis_neuron": 2, "a_compress_rate": 1,
                "a_compress_e_rate": 2, "a_compress_use_split": True, "edge_init_use_dist": True, "use_exp_switch": True,
                "smooth_edge_update": True, "use_dynamic_sel": True, "sel_reduce_factor": 4.0},
}
# the multi-task descriptor: strip repinit with a non-zero mean, no g1 conv/MLP outputs (and no
# add_tebd_to_repinit_out: deepmd-kit keeps that layer per branch, so the branches would not share one descriptor)
DPA2_SHARED = {
    "type": "dpa2", "precision": "float64", "smooth": True, "seed": 1, "concat_output_tebd": False,
    "repinit": {"rcut": 6.0, "rcut_smth": 0.5, "nsel": 24, "neuron": [4, 8], "axis_neuron": 4, "tebd_dim": 4,
                "tebd_input_mode": "strip", "type_one_side": True, "set_davg_zero": False, "resnet_dt": True},
    "repformer": {**REPFORMER, "attn2_nhead": 1, "direct_dist": True, "update_style": "res_incr", "use_sqrt_nnei": False,
                  "g1_out_conv": False, "g1_out_mlp": False, "set_davg_zero": False, "activation_function": "silu"},
}
BRANCHES = ("ch4", "chon")
MULTI = ("multitask", "multitask_dpa3")
FRAMES = {  # system -> frames compared (periodic CH4; two molecules without PBC)
    ("ch4_pbe", "valid"): [0, 20, 40],
    ("chon_nopbc", "valid", "C1H4O2"): [0, 150],
    ("chon_nopbc", "valid", "C3H3O4"): [0, 50],
}


def multitask_input(desc: dict = DPA2_SHARED, shared_fitting: bool = False) -> dict:
    """Two branches (periodic CH4, CHO molecules) sharing one descriptor (and, with
    shared_fitting, one fitting net with a dataset encoding)."""
    fit = {"neuron": [8, 8], "resnet_dt": True}
    loss = {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1}
    data = {"ch4": [data_path("ch4_pbe", "train")],
            "chon": [data_path("chon_nopbc", "train", "C1H4O2"), data_path("chon_nopbc", "train", "C3H3O4")]}
    base = train_input(TYPE_MAP, desc, [], steps=6)
    shared = {"tm": TYPE_MAP, "desc": desc}
    if shared_fitting:
        shared["fit"] = {**fit, "seed": 1, "dim_case_embd": len(BRANCHES)}
    return {
        "model": {"shared_dict": shared,
                  "model_dict": {b: {"type_map": "tm", "descriptor": "desc",
                                     "fitting_net": "fit" if shared_fitting else {**fit, "seed": i + 1}}
                                 for i, b in enumerate(BRANCHES)}},
        "learning_rate": base["learning_rate"],
        "loss_dict": {b: loss for b in BRANCHES},
        "training": {**{k: v for k, v in base["training"].items() if k != "training_data"},
                     "model_prob": {b: 0.5 for b in BRANCHES},
                     "data_dict": {b: {"training_data": {"systems": [str(p) for p in data[b]], "batch_size": 1}}
                                   for b in BRANCHES}},
    }


@pytest.fixture(scope="session")
def deepmd_python():
    try:
        return ensure_deepmd_venv()
    except DeepmdUnavailable as e:
        pytest.skip(f"reference deepmd-kit cannot be installed here: {e}")


@pytest.fixture(scope="session")
def trained(deepmd_python, tmp_path_factory) -> dict[str, Path]:
    """name -> model.ckpt.pt, trained once per session ($LAMFLOW_DEEPMD_CACHE keeps them across sessions)."""
    root = tmp_path_factory.mktemp("deepmd")
    cache = Path(os.environ["LAMFLOW_DEEPMD_CACHE"]) if os.environ.get("LAMFLOW_DEEPMD_CACHE") else None
    systems = [data_path("ch4_pbe", "train"), data_path("chon_nopbc", "train", "C1H4O2")]
    out = {name: dp_train(deepmd_python, train_input(TYPE_MAP, desc, systems), root / name, cache)
           for name, desc in SINGLE.items()}
    out["multitask"] = dp_train(deepmd_python, multitask_input(), root / "multitask", cache)
    out["multitask_dpa3"] = dp_train(deepmd_python, multitask_input(DPA3_SHARED, shared_fitting=True),
                                     root / "multitask_dpa3", cache)
    return out


@pytest.fixture(scope="session")
def frames() -> dict[str, tuple]:
    """system name -> (coord, box or None, atype over TYPE_MAP)."""
    return load_frames(FRAMES, TYPE_MAP)


@pytest.fixture(scope="session")
def reference(deepmd_python, trained, frames, tmp_path_factory) -> dict[tuple, dict]:
    """(model name, head, system) -> DeepPot's energy/force/virial; one subprocess for all."""
    keys = [(n, None, s) for n in SINGLE for s in frames] + [(m, b, s) for m in MULTI for b in BRANCHES for s in frames]
    jobs = [{"model": trained[n], "head": h, "coord": frames[s][0], "box": frames[s][1], "atype": frames[s][2]}
            for n, h, s in keys]
    return dict(zip(keys, deeppot_eval(deepmd_python, jobs, tmp_path_factory.mktemp("deeppot"))))


def assert_matches(model, name, head, frames, reference):
    atol, rtol = TOL[str(model.dtype).removeprefix("torch.")]
    for system, (coord, box, atype) in frames.items():
        ours, ref = evaluate(model, coord, box, atype), reference[(name, head, system)]
        np.testing.assert_allclose(ours["energy"], ref["energy"], rtol=rtol, atol=atol, err_msg=f"{name} {system} energy")
        np.testing.assert_allclose(ours["force"], ref["force"], rtol=rtol, atol=atol, err_msg=f"{name} {system} force")
        if box is not None:
            np.testing.assert_allclose(ours["virial"], ref["virial"], rtol=rtol, atol=atol, err_msg=f"{name} {system} virial")


@pytest.mark.parametrize("name", list(SINGLE))
def test_imported_model_matches_deeppot_energy_force_virial(name, trained, frames, reference, tmp_path):
    out = import_deepmd(trained[name], tmp_path / "ours.pt")
    model = load_model(out)
    assert model.cfg.descriptor.type == SINGLE[name]["type"]
    assert model.type_map == TYPE_MAP
    assert_matches(model, name, None, frames, reference)


@pytest.mark.parametrize("name", MULTI)
def test_multitask_checkpoint_imports_every_branch(name, trained, frames, reference, tmp_path):
    """DPA-2 with one fitting net per branch; DPA-3 (the DPA-3.1 options) with one fitting net
    shared through a dataset encoding (dim_case_embd), folded into each branch's first-layer bias."""
    from lamflow.model.nn.multitask import MultiTaskModel
    from lamflow.model.training.pretrained import load_branch

    assert branches(read_deepmd(trained[name])) == list(BRANCHES)
    out = import_deepmd(trained[name], tmp_path / "mt.pt")
    payload = read_checkpoint(out)
    assert payload["kind"] == "multitask" and sorted(payload["config"]["branches"]) == sorted(BRANCHES)
    assert isinstance(load_model(out), MultiTaskModel)
    for b in BRANCHES:
        assert_matches(load_branch(out, b), name, b, frames, reference)
    if name == "multitask_dpa3":  # one shared fitting net, told apart by the folded case embedding only
        w = [read_checkpoint(out)["state_dict"][f"heads.{b}.fitting.nets.0.hidden.layers.0.bias"] for b in BRANCHES]
        assert not torch.allclose(w[0], w[1])


def test_multitask_branch_imports_as_single_task_model(trained, frames, reference, tmp_path):
    assert main(["import-deepmd", str(trained["multitask"]), "-o", str(tmp_path / "chon.pt"), "--branch", "chon"]) == 0
    model = load_model(tmp_path / "chon.pt")
    assert model.kind == "energy"
    assert_matches(model, "multitask", "chon", frames, reference)


def test_lamflow_loaders_accept_a_deepmd_checkpoint_directly(trained, frames, reference):
    """read_checkpoint / load_model (and so fine-tuning and the pipeline) convert on the fly."""
    from lamflow.model.training.finetune import starting_model as load_pretrained

    assert_matches(load_model(trained["se_atten_v2"]), "se_atten_v2", None, frames, reference)
    model, payload = load_any(trained["multitask"], branch="ch4")
    assert payload["imported_from"]["branch"] == "ch4"
    assert_matches(model, "multitask", "ch4", frames, reference)
    base, head = load_pretrained(trained["multitask"], "chon")
    assert head == "chon"
    assert_matches(base, "multitask", "chon", frames, reference)


def test_import_deepmd_cli_writes_checkpoint_and_lists_branches(trained, tmp_path, capsys):
    assert main(["import-deepmd", str(trained["se_e2_a"]), "-o", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file()
    assert main(["import-deepmd", str(trained["multitask"]), "--list-branches"]) == 0
    assert capsys.readouterr().out.split()[-2:] == list(BRANCHES)
    assert main(["import-deepmd", str(trained["multitask"]), "-o", str(tmp_path / "x.pt"), "--branch", "water"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no branch 'water'" in err and "ch4" in err
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- what is refused, and how


def edited(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt["model"], ckpt["model"]["_extra_state"]["model_params"])
    torch.save(ckpt, dst)
    return dst


def import_error(path: Path, branch=None) -> str:
    with pytest.raises(CheckpointError) as e:
        convert(path, branch)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("edit, words", [
    (lambda sd, p: p["descriptor"].update(type="se_e3"), ["descriptor type 'se_e3'"]),
    (lambda sd, p: p["descriptor"].update(exclude_types=[[0, 1]]), ["exclude_types"]),
    (lambda sd, p: p["descriptor"].update(shiny_new_option=True), ["shiny_new_option"]),
    (lambda sd, p: p["fitting_net"].update(numb_fparam=2), ["fitting_net", "numb_fparam=2"]),
    (lambda sd, p: p["descriptor"].update(activation_function="relu6"), ["activation_function='relu6'"]),
    (lambda sd, p: p.update(pair_exclude_types=[[0, 2]]), ["pair_exclude_types"]),
    (lambda sd, p: sd.update({"model.Default.atomic_model.fitting_net.case_embd": torch.ones(2)}), ["case_embd"]),
])
def test_unsupported_option_fails_naming_it(trained, tmp_path, edit, words):
    msg = import_error(edited(trained["se_e2_a"], tmp_path / "bad.pt", edit))
    for w in words:
        assert w in msg


def test_unknown_dpa2_option_fails_naming_it(trained, tmp_path):
    path = edited(trained["dpa2"], tmp_path / "bad.pt", lambda sd, p: p["descriptor"]["repformer"].update(use_loc_mapping=True))
    msg = import_error(path)
    assert "repformer.use_loc_mapping" in msg and "unknown key" in msg


def test_compressed_model_is_refused(trained, tmp_path):
    key = "model.Default.atomic_model.descriptor.sea.compress_data.0"
    msg = import_error(edited(trained["se_e2_a"], tmp_path / "c.pt", lambda sd, p: sd.update({key: torch.ones(6)})))
    assert "compress_data" in msg


def test_order_dependent_empty_slots_are_refused(trained, tmp_path):
    """deepmd-kit's concat DPA-1 embeds empty neighbour slots with atom 0's type; with a non-zero
    env-matrix mean that reaches the energy, which lamflow will not reproduce."""
    key = "model.Default.atomic_model.descriptor.se_atten.mean"
    path = edited(trained["se_atten"], tmp_path / "m.pt", lambda sd, p: sd[key].fill_(0.1))
    assert "set_davg_zero" in import_error(path)


def test_multitask_branches_without_a_shared_descriptor_need_a_branch(trained, frames, reference, tmp_path):
    key = "model.chon.atomic_model.descriptor.type_embedding.embedding.embedding_net.layers.0.matrix"
    path = edited(trained["multitask"], tmp_path / "mt.pt", lambda sd, p: sd.update({key: sd[key] + 1.0}))
    assert "--branch" in import_error(path)
    model, _ = convert(path, "ch4")
    assert_matches(model, "multitask", "ch4", frames, reference)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, to write a frozen-model look-alike
def test_reading_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling would call open(marker, "w")
            return (open, (str(marker), "w"))

    torch.save({"model": {"_extra_state": {"model_params": Evil()}}}, tmp_path / "evil.pt")
    assert "cannot be read as plain tensors" in import_error(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"model": {"weights": torch.ones(2)}}, tmp_path / "other.pt")
    assert "not a deepmd-kit checkpoint" in import_error(tmp_path / "other.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "frozen.pth")
    assert "frozen TorchScript model" in import_error(tmp_path / "frozen.pth")


def test_show_and_change_bias_read_deepmd_checkpoints(trained, frames, reference, tmp_path, capsys):
    """Both model tools take a deepmd-kit .pt directly; change-bias writes a lamflow checkpoint."""
    import json

    assert main(["show", str(trained["multitask_dpa3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["imported_from"] == str(trained["multitask_dpa3"]) and sorted(info["branches"]) == sorted(BRANCHES)
    assert info["descriptor"]["type"] == "dpa3" and info["descriptor"]["rcut"] == 4.0
    out = tmp_path / "b.ckpt"
    assert main(["change-bias", str(trained["dpa3"]), "-b", "-1", "-2", "-3", "-o", str(out)]) == 0
    model = load_model(out)
    assert model.out_bias.tolist() == [-1.0, -2.0, -3.0]
    model.out_bias.copy_(load_model(trained["dpa3"]).out_bias)  # everything else is the imported model
    assert_matches(model, "dpa3", None, frames, reference)
