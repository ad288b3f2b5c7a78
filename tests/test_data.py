"""Every DataError case names the system and frame in one line; loaders accept mixed dtypes and shapes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path

from lamflow.model.data import DataSet, load_systems, max_neighbor_counts
from lamflow.model.errors import DataError
from lamflow.model.neighbor import NlistRequest


def copy_system(tmp_path: Path, *parts) -> Path:
    dst = tmp_path / "sys"
    shutil.copytree(data_path(*parts), dst)
    for f in dst.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    dst.chmod(0o755)
    return dst


def edit(path: Path, fn) -> None:
    a = np.load(path)
    a = fn(a.copy())
    np.save(path, a)


def test_loads_periodic_and_nonperiodic_systems_with_type_map_by_name():
    water = load_systems(str(data_path("water_h2o", "train")), ["H", "O"])  # reversed type map
    assert len(water) == 3 and water[0].natoms == 192 and water[0].pbc
    assert set(water[0].atype.tolist()) == {0, 1}
    chon = load_systems(str(data_path("chon_nopbc", "train")), ["O", "C", "H", "N"])
    assert all(not s.pbc for s in chon) and chon[0].box is None
    assert chon[0].coord.dtype == np.float64 and chon[0].energy.shape == (chon[0].nframes,)


def test_energy_of_shape_n_by_1_and_float32_are_accepted(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    edit(p / "set.000" / "energy.npy", lambda a: a.reshape(-1, 1).astype(np.float32))
    edit(p / "set.000" / "coord.npy", lambda a: a.astype(np.float32))
    s = load_systems(str(p), ["H", "C"])[0]
    assert s.energy.shape == (s.nframes,) and s.coord.dtype == np.float64


def test_other_dpdata_formats_load(tmp_path):
    import dpdata

    sys = dpdata.LabeledSystem(str(data_path("ch4_pbe", "valid")), fmt="deepmd/npy")
    sys.to("deepmd/raw", str(tmp_path / "raw"))
    raw = load_systems(str(tmp_path / "raw"), ["H", "C"])[0]
    npy = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    np.testing.assert_allclose(raw.force, npy.force, rtol=1e-6)
    sys[:3].to("extxyz", str(tmp_path / "a.xyz"))
    xyz = load_systems(str(tmp_path / "a.xyz"), ["H", "C"], fmt="extxyz")
    assert sum(s.nframes for s in xyz) == 3


@pytest.mark.parametrize(
    "label,mutate,expected",
    [
        ("force", lambda a: _set(a, 17, np.nan), "frame 17: force contains NaN"),
        ("energy", lambda a: _set(a, 3, np.inf), "frame 3: energy contains inf"),
        ("coord", lambda a: _set(a, 5, np.nan), "frame 5: coord contains NaN"),
        ("force", lambda a: a[:, :-3], "force has 12 values per frame, expected 15"),
        ("energy", lambda a: a[:-2], "energy has 58 frames, coord has 60"),
    ],
)
def test_bad_labels_raise_data_error_naming_system_and_frame(tmp_path, label, mutate, expected):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    edit(p / "set.000" / f"{label}.npy", mutate)
    with pytest.raises(DataError) as e:
        load_systems(str(p), ["H", "C"])
    msg = str(e.value)
    assert expected in msg and str(p) in msg and "\n" not in msg


def _set(a, k, v):
    a.reshape(len(a), -1)[k, 0] = v
    return a


def test_element_missing_from_type_map_is_named():
    with pytest.raises(DataError, match=r"element\(s\) O not in the model type map \['H'\]"):
        load_systems(str(data_path("water_h2o", "valid")), ["H"])


def test_empty_system_is_rejected(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    edit(p / "set.000" / "coord.npy", lambda a: a[:0])
    with pytest.raises(DataError, match="empty system"):
        load_systems(str(p), ["H", "C"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no system found"):
        load_systems(str(tmp_path / "nothing"), ["H", "C"])


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_systems(str(tmp_path / "nope"), ["H"])


def test_sel_too_small_is_a_clear_error_before_training():
    s = load_systems(str(data_path("water_h2o", "valid")), ["O", "H"])
    per_type, total = max_neighbor_counts(s[:1], 6.0, 2)
    assert per_type[0] > 20 and total == per_type.sum() or total <= per_type.sum()
    with pytest.raises(DataError, match=r"frame 0: atom \d+ has \[\d+, \d+\] neighbours within rcut but sel is \[20, 40\]"):
        DataSet([s[0].subset([0, 1])], [NlistRequest(6.0, (20, 40), False)], 1, torch.float64)


def test_batches_mix_systems_of_different_sizes():
    from lamflow.model.data import collate
    from lamflow.model.infer import evaluate
    from lamflow.model.potential import predict
    from test_descriptors import TestSeAtten

    t = TestSeAtten()
    model = t.make_model()
    a = load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])
    ds = DataSet(a, model.nlist_requests(), 1, torch.float64)
    batch = collate([(a[0], 0, ds.graphs[0][0]), (a[1], 2, ds.graphs[1][2])], torch.float64)
    assert batch.coord.shape[1] == max(a[0].natoms, a[1].natoms)
    p = predict(model, batch)
    e0 = evaluate(model, a[0].coord[:1], None, a[0].atype)
    e1 = evaluate(model, a[1].coord[2:3], None, a[1].atype)
    assert abs(p.energy[0].item() - e0["energy"][0]) < 1e-10 and abs(p.energy[1].item() - e1["energy"][0]) < 1e-10
    np.testing.assert_allclose(p.force[0, : a[0].natoms].detach().numpy(), e0["force"][0], atol=1e-12)
    assert torch.all(p.force[0, a[0].natoms :] == 0)
