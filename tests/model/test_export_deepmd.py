"""Exporting lamflow models to deepmd-kit 3.x checkpoints (`lamflow export-deepmd`).

lamflow models with random weights and statistics (se_e2_a both ways, float32, se_atten, se_atten_v2
with a non-zero mean, DPA-2 with three-body, a two-branch multi-task model) are exported, then:
imported back, they predict bit for bit what they predicted before; deepmd-kit's own `DeepPot`
(in the reference venv) gives lamflow's energies, forces and virials to 1e-10 (float64) on
periodic (ch4_pbe) and non-periodic (chon_nopbc) frames; `dp --pt freeze` accepts the file and
the frozen model predicts the same; `dp --pt compress` accepts the frozen se_e2_a. What deepmd-kit
cannot express fails with one line naming it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from deepmd_helpers import REPO, _env, deeppot_eval, ensure_deepmd_venv, load_frames

from lamflow.model.io.checkpoint import load_model
from lamflow.model.io.deepmd_export import export_deepmd, export_payload
from lamflow.model.io.deepmd_import import convert_state
from lamflow.model.io.payload import save_model
from lamflow.model.nn.infer import evaluate
from lamflow.model.nn.multitask import MultiTaskModel
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.compress import compress
from lamflow.workflows.cli import main

TYPE_MAP = ["H", "C", "O"]
FIT = {"neuron": [8, 8], "resnet_dt": True, "seed": 3}
ATTEN = {"type": "se_atten", "rcut": 6.0, "rcut_smth": 0.5, "sel": 24, "neuron": [4, 8], "axis_neuron": 4,
         "attn": 8, "attn_layer": 2, "tebd_dim": 4, "seed": 1}
MODELS = {  # name -> descriptor; each model gets random weights and random statistics
    "se_e2_a": {"type": "se_e2_a", "rcut": 6.0, "rcut_smth": 0.5, "sel": [12, 6, 6], "neuron": [4, 8],
                "axis_neuron": 4, "resnet_dt": True, "seed": 1},
    "se_e2_a_one_side_float32": {"type": "se_e2_a", "rcut": 5.0, "rcut_smth": 1.0, "sel": [12, 6, 6],
                                 "neuron": [4, 8, 16], "axis_neuron": 4, "type_one_side": True,
                                 "precision": "float32", "seed": 2},
    "se_atten": ATTEN,  # lamflow's default smooth_type_embedding=True, spelled out for deepmd-kit
    "se_atten_v2_nonzero_mean": {**ATTEN, "type": "se_atten_v2", "attn_layer": 1, "set_davg_zero": False},
    "dpa2": {"type": "dpa2", "precision": "float64", "seed": 1, "add_tebd_to_repinit_out": True,
             "repinit": {"rcut": 6.0, "rcut_smth": 0.5, "nsel": 24, "neuron": [4, 8], "axis_neuron": 4, "tebd_dim": 4,
                         "use_three_body": True, "three_body_neuron": [2, 4], "three_body_rcut": 4.0,
                         "three_body_rcut_smth": 3.5, "three_body_sel": 12},
             "repformer": {"rcut": 4.0, "rcut_smth": 3.5, "nsel": 12, "nlayers": 2, "g1_dim": 8, "g2_dim": 4,
                           "axis_neuron": 2, "attn1_hidden": 4, "attn1_nhead": 2, "attn2_hidden": 4,
                           "attn2_nhead": 2, "attn2_has_gate": True, "update_h2": True,
                           "update_style": "res_residual", "update_residual": 0.01}},
    "dpa3": {"type": "dpa3", "precision": "float64", "seed": 1, "activation_function": "silu",
             "repflow": {"n_dim": 8, "e_dim": 6, "a_dim": 4, "nlayers": 2, "e_rcut": 5.0, "e_rcut_smth": 0.5, "e_sel": 24,
                         "a_rcut": 3.5, "a_rcut_smth": 3.0, "a_sel": 12, "axis_neuron": 2, "update_angle": True,
                         "smooth_edge_update": True, "a_compress_rate": 1, "a_compress_e_rate": 2,
                         "a_compress_use_split": True, "n_multi_edge_message": 2}},
}
FRAMES = {("ch4_pbe", "valid"): [0, 30], ("chon_nopbc", "valid", "C1H4O2"): [0, 150]}


def randomise(model, seed: int):
    """Non-trivial statistics and biases (means only where the config lets them be non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            # like real statistics: one value per centre type and env-matrix column, the same for
            # every neighbour slot (a per-slot value would make the energy depend on slot order)
            per_type = (buf.shape[0], 1, buf.shape[-1]) if buf.ndim == 3 else buf.shape
            if name.endswith("stddev"):
                buf.copy_((0.5 + torch.rand(per_type, generator=g, dtype=torch.float64)).expand(buf.shape))
            elif name.endswith(".mean") and not davg_zero(model, name):
                buf.copy_((0.1 * torch.randn(per_type, generator=g, dtype=torch.float64)).expand(buf.shape))
            elif name.endswith("out_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=torch.float64) - 5.0)
        for name, p in model.named_parameters():
            if name.endswith("bias_atom_e"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


def davg_zero(model, buffer: str) -> bool:
    d = model.cfg.descriptor
    return bool(getattr(d, "set_davg_zero", True)) if d.type != "dpa2" else True


def build(name: str) -> EnergyModel:
    return randomise(EnergyModel.from_config({"type_map": TYPE_MAP, "descriptor": MODELS[name], "fitting_net": FIT}),
                     seed=len(name))


def build_multitask() -> MultiTaskModel:
    cfg = {"type_map": TYPE_MAP, "descriptor": MODELS["dpa2"],
           "branches": {"ch4": {"task": "ener", "type_map": ["H", "C"], "fitting_net": FIT},
                        "chon": {"task": "ener", "type_map": TYPE_MAP, "fitting_net": {**FIT, "seed": 4}}}}
    return randomise(MultiTaskModel.from_config(cfg), seed=7)


@pytest.fixture(scope="session")
def deepmd_python():
    return ensure_deepmd_venv()  # installs the wheel-based reference venv when none exists; fails if it cannot


@pytest.fixture(scope="session")
def frames() -> dict[str, tuple]:
    """system name -> (coord, box or None, atype over TYPE_MAP)."""
    return load_frames(FRAMES, TYPE_MAP)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """name -> (lamflow checkpoint, exported deepmd-kit checkpoint, head or None)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in MODELS:
        ours = save_model(build(name), root / f"{name}.ckpt")
        out[name] = (ours, export_deepmd(ours, root / f"{name}.pt")[0], None)
    mt = save_model(build_multitask(), root / "mt.ckpt")
    mt_out = export_deepmd(mt, root / "mt.pt")[0]
    for b in ("ch4", "chon"):
        out[f"multitask/{b}"] = (mt, mt_out, b)
    return out


def lamflow_model(ckpt: Path, head: str | None):
    model = load_model(ckpt)
    return model.branch_model(head) if head else model


def test_export_then_import_predicts_bit_for_bit(exported, frames):
    for name, (ours, theirs, head) in exported.items():
        obj = torch.load(theirs, map_location="cpu", weights_only=True)  # plain tensors and data only
        back, _ = convert_state(obj, str(theirs), head)
        model = lamflow_model(ours, head)
        for system, (coord, box, atype) in frames.items():
            a, b = evaluate(model, coord, box, atype), evaluate(back, coord, box, atype)
            for key in a:
                assert np.array_equal(a[key], b[key]), f"{name} {system} {key}"


def test_deeppot_on_the_exported_file_matches_lamflow(deepmd_python, exported, frames, tmp_path):
    keys = [(n, s) for n in exported for s in frames]
    jobs = [{"model": exported[n][1], "head": exported[n][2], "coord": frames[s][0], "box": frames[s][1],
             "atype": frames[s][2]} for n, s in keys]
    for (name, system), ref in zip(keys, deeppot_eval(deepmd_python, jobs, tmp_path)):
        ours, _, head = exported[name]
        model = lamflow_model(ours, head)
        coord, box, atype = frames[system]
        got = evaluate(model, coord, box, atype)
        tol = 1e-10 if model.dtype == torch.float64 else 2e-4
        assert list(ref["type_map"]) == TYPE_MAP
        np.testing.assert_allclose(ref["energy"], got["energy"], rtol=0, atol=tol * max(1, len(atype)),
                                   err_msg=f"{name} {system} energy")
        np.testing.assert_allclose(ref["force"], got["force"], rtol=0, atol=tol, err_msg=f"{name} {system} force")
        if box is not None:
            np.testing.assert_allclose(ref["virial"], got["virial"], rtol=0, atol=tol * max(1, len(atype)),
                                       err_msg=f"{name} {system} virial")


def _dp(python: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python.parent / "dp"), "--pt", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="session")
def deepmd_src_python():
    """The reference venv built from source: `dp compress` needs deepmd-kit's C++ ops for torch 2.13
    (setup_venv.sh is idempotent: it returns at once when the venv is complete)."""
    r = subprocess.run(["bash", str(REPO / "bench" / "deepmd_ref" / "setup_venv.sh")], capture_output=True, text=True,
                       timeout=1800, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return Path(r.stdout.strip().splitlines()[-1])


def test_dp_freeze_and_compress_accept_the_export(deepmd_src_python, exported, frames, tmp_path):
    """Frozen (TorchScript) exports predict as lamflow does; the frozen se_e2_a compresses (its
    export carries the checkpoint's min_nbor_dist, which `dp compress` needs)."""
    py = deepmd_src_python
    payload = torch.load(exported["se_e2_a"][0], weights_only=True)
    torch.save({**payload, "min_nbor_dist": 0.9}, tmp_path / "se_e2_a.ckpt")
    export_deepmd(tmp_path / "se_e2_a.ckpt", tmp_path / "se_e2_a.pt")
    cases = {"se_e2_a": (tmp_path / "se_e2_a.pt", None), "multitask/chon": (exported["multitask/chon"][1], "chon")}
    coord, box, atype = frames["ch4_pbe/valid"]
    jobs = []
    for name, (theirs, head) in cases.items():
        frozen = tmp_path / f"{name.replace('/', '-')}.pth"
        r = _dp(py, "freeze", "-c", str(theirs), "-o", str(frozen), *(["--head", head] if head else []), cwd=tmp_path)
        assert r.returncode == 0 and frozen.is_file(), r.stderr[-2000:]
        jobs.append({"model": frozen, "coord": coord, "box": box, "atype": atype})
    r = _dp(py, "compress", "-i", "se_e2_a.pth", "-o", "compressed.pth", "-s", "0.01", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "compressed.pth").is_file(), r.stderr[-2000:]
    for name, ref in zip(cases, deeppot_eval(py, jobs, tmp_path / "eval")):
        got = evaluate(lamflow_model(exported[name][0], exported[name][2]), coord, box, atype)
        np.testing.assert_allclose(ref["energy"], got["energy"], rtol=0, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(ref["force"], got["force"], rtol=0, atol=1e-10, err_msg=name)


def test_compressed_model_exports_its_parent_and_the_dp_compress_settings(tmp_path):
    model = build("se_e2_a")
    parent = save_model(model, tmp_path / "student.ckpt", extra={"min_nbor_dist": 0.95})
    compress(parent, tmp_path / "small.ckpt", stride=0.02, extrapolate=4.0, log=lambda *a: None)
    out, info = export_deepmd(tmp_path / "small.ckpt", tmp_path / "small.pt")
    assert info["compress"] == {"stride": 0.02, "extrapolate": 4.0, "check_frequency": -1, "min_nbor_dist": 0.95}
    sd = torch.load(out, weights_only=True)["model"]
    ref = export_payload(model, "parent", 0.95)["model"]
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if k != "_extra_state")
    assert float(sd["model.Default.min_nbor_dist"]) == 0.95


def test_cli_writes_the_model_and_a_card_with_the_commands(tmp_path, capsys):
    ours = save_model(build("se_atten"), tmp_path / "m" / "model.ckpt")
    (tmp_path / "m" / "train.json").write_text('{"rmse_e_per_atom": 0.0012, "rmse_f": 0.045}')
    assert main(["export-deepmd", str(tmp_path / "m"), "-o", str(tmp_path / "out" / "model.pt")]) == 0
    assert (tmp_path / "out" / "model.pt").is_file()
    card = (tmp_path / "out" / "model.md").read_text()
    for words in ("H C O", "rcut 6.0 A", "dp --pt freeze -c model.pt -o model-frozen.pth", "dp --pt compress",
                  "pair_style deepmd model-frozen.pth", "pair_coeff * * H C O", "| overall | 1.20 | 45.00 |"):
        assert words in card, words
    assert str(ours) in card


@pytest.mark.parametrize("make, words", [
    (lambda: randomise(EnergyModel.from_config({"type_map": TYPE_MAP, "descriptor": {**ATTEN, "attn_mask": True},
                                                "fitting_net": FIT}), 1), "attn_mask"),
    (lambda: randomise(EnergyModel.from_config({"type_map": TYPE_MAP, "descriptor": {**ATTEN, "set_davg_zero": False},
                                                "fitting_net": FIT}), 1), "set_davg_zero"),
])
def test_what_deepmd_kit_cannot_express_fails_in_one_line(tmp_path, capsys, make, words):
    ours = save_model(make(), tmp_path / "m.ckpt")
    assert main(["export-deepmd", str(ours), "-o", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_a_branch_exports_as_a_single_task_checkpoint_and_unknown_branches_fail(tmp_path, capsys):
    mt = save_model(build_multitask(), tmp_path / "mt.ckpt")
    out, info = export_deepmd(mt, tmp_path / "chon.pt", branch="chon")
    assert info["branches"] == ["Default"]
    back, _ = convert_state(torch.load(out, weights_only=True), str(out))
    assert back.kind == "energy"
    assert main(["export-deepmd", str(mt), "-o", str(tmp_path / "w.pt"), "--branch", "water"]) == 1
    assert "no branch 'water'" in capsys.readouterr().err
