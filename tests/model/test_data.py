"""Every DataError case names the system and frame in one line; loaders accept mixed dtypes and shapes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path

from lamflow.model.data.batch import DataSet, max_neighbor_counts
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import DataError


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


def test_sel_too_small_is_a_clear_error_when_the_batch_is_made():
    s = load_systems(str(data_path("water_h2o", "valid")), ["O", "H"], lazy=True)
    per_type, total = max_neighbor_counts(s[:1], 6.0, 2, frames=[[0]])
    assert per_type[0] > 20 and total <= per_type.sum()
    ds = DataSet([s[0]], [NlistRequest(6.0, (20, 40), False)], 1, torch.float64)
    with pytest.raises(DataError, match=r"frame 7: atom \d+ has \[\d+, \d+\] neighbours within rcut but sel is \[20, 40\]"):
        ds.frames(0, [7])


def test_batches_mix_systems_of_different_sizes():
    from test_descriptors import TestSeAtten

    from lamflow.model.data.batch import collate, frame_graph, make_batch, pad_frames
    from lamflow.model.nn.infer import evaluate
    from lamflow.model.nn.potential import predict

    t = TestSeAtten()
    model = t.make_model()
    a = load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])
    reqs = model.nlist_requests()
    batch = make_batch(pad_frames([(a[0], 0), (a[1], 2)], torch.float64), reqs)
    ref = collate([(a[0], 0, frame_graph(a[0], 0, reqs)), (a[1], 2, frame_graph(a[1], 2, reqs))], torch.float64)
    for x, y in zip(batch.nlists + [batch.mapping], ref.nlists + [ref.mapping]):
        assert torch.equal(x, y)
    assert batch.coord.shape[1] == max(a[0].natoms, a[1].natoms)
    p = predict(model, batch)
    e0 = evaluate(model, a[0].coord[:1], None, a[0].atype)
    e1 = evaluate(model, a[1].coord[2:3], None, a[1].atype)
    assert abs(p.energy[0].item() - e0["energy"][0]) < 1e-10 and abs(p.energy[1].item() - e1["energy"][0]) < 1e-10
    np.testing.assert_allclose(p.force[0, : a[0].natoms].detach().numpy(), e0["force"][0], atol=1e-12)
    assert torch.all(p.force[0, a[0].natoms :] == 0)


# ----------------------------------------------------------------------------- broken files (issue 17)


def test_a_set_with_another_atom_count_names_its_file(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    shutil.copytree(p / "set.000", p / "set.001")
    edit(p / "set.001" / "coord.npy", lambda a: a.reshape(len(a), -1)[:, :-3])
    with pytest.raises(DataError) as e:
        load_systems(str(p), ["H", "C"])
    assert str(e.value) == f"{p / 'set.001' / 'coord.npy'}: coord has 12 values per frame, expected 15 (5 atoms in type.raw x 3)"


def test_type_map_listing_an_element_twice_is_refused(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    (p / "type_map.raw").write_text("H\nH\n")
    with pytest.raises(DataError, match=r"type_map.raw: element H listed twice \(entries 0 and 1\)"):
        load_systems(str(p), ["H", "C"])


def test_text_saved_as_npy_is_reported_as_not_a_npy_file(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    (p / "set.000" / "coord.npy").write_text("0.0 0.0 0.0\n1.0 0.0 0.0\n")
    with pytest.raises(DataError) as e:
        load_systems(str(p), ["H", "C"])
    assert str(e.value).startswith(f"{p / 'set.000' / 'coord.npy'}: not a valid .npy file") and "pickle" not in str(e.value)


def test_a_negative_type_index_is_reported_as_itself(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    (p / "type.raw").write_text("0\n0\n-1\n0\n1\n")
    with pytest.raises(DataError, match=r"type.raw: type index -1 \(atom 2\) outside type_map.raw"):
        load_systems(str(p), ["H", "C"])


def test_a_truncated_npy_names_its_file(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    f = p / "set.000" / "force.npy"
    f.write_bytes(f.read_bytes()[:-100])
    for lazy in (False, True):
        with pytest.raises(DataError, match=rf"^{f}: truncated \(\d+ bytes, its header \(60, 15\) float\d+ needs \d+\)$"):
            load_systems(str(p), ["H", "C"], lazy=lazy)


@pytest.mark.parametrize("offset", [0.0, 0.05])
def test_atoms_on_top_of_each_other_are_named_with_system_and_frame(tmp_path, offset):
    p = copy_system(tmp_path, "ch4_pbe", "valid")

    def overlap(a):
        a = a.reshape(len(a), -1, 3)
        a[4, 3] = a[4, 1] + offset
        return a.reshape(len(a), -1)

    edit(p / "set.000" / "coord.npy", overlap)
    s = load_systems(str(p), ["H", "C"], lazy=True)
    ds = DataSet(s, [NlistRequest(6.0, (20, 20), False)], 2, torch.float64)
    ds.frames(0, [0, 1])  # healthy frames pass
    with pytest.raises(DataError, match=rf"^{p} frame 4: atoms [13] and [13] are [\d.e-]+ A apart \(on top of each other"):
        ds.frames(0, [3, 4])


# ----------------------------------------------------------------------------- lazy data


def test_lazy_systems_read_frames_from_memory_maps_and_match_eager_ones():
    from lamflow.model.data.systems import FrameArray

    lazy = load_systems(str(data_path("water_h2o", "train")), ["H", "O"], lazy=True)
    eager = load_systems(str(data_path("water_h2o", "train")), ["H", "O"])
    for a, b in zip(lazy, eager):
        assert isinstance(a.coord, FrameArray)
        assert a.coord.shape == b.coord.shape and a.energy.shape == b.energy.shape
        np.testing.assert_array_equal(a.coord[7], b.coord[7])
        np.testing.assert_array_equal(a.force[[3, 1]], b.force[[3, 1]])
        np.testing.assert_array_equal(np.asarray(a.box), b.box)
        assert isinstance(a.coord.part(0), np.memmap) and not a.force._maps  # frames are read by offset, not mapped


def test_frames_are_counted_across_sets(tmp_path):
    p = copy_system(tmp_path, "ch4_pbe", "valid")
    shutil.copytree(p / "set.000", p / "set.001")
    edit(p / "set.001" / "energy.npy", lambda a: a + 1.0)
    s = load_systems(str(p), ["H", "C"], lazy=True)[0]
    assert s.nframes == 120 and s.energy.counts == [60, 60]
    assert s.energy[65] == pytest.approx(s.energy[5] + 1.0)


def test_other_formats_are_converted_once_into_the_cache(tmp_path, monkeypatch):
    import dpdata

    import lamflow.model.data.formats as data

    monkeypatch.setenv("LAMFLOW_CACHE", str(tmp_path / "cache"))
    dpdata.LabeledSystem(str(data_path("ch4_pbe", "valid")), fmt="deepmd/npy")[:4].to("extxyz", str(tmp_path / "a.xyz"))
    first = load_systems(str(tmp_path / "a.xyz"), ["H", "C"], fmt="extxyz", lazy=True)
    monkeypatch.setattr(data, "_read_dpdata", lambda *a: pytest.fail("converted again"))
    again = load_systems(str(tmp_path / "a.xyz"), ["H", "C"], fmt="extxyz", lazy=True)
    assert [s.name for s in again] == [s.name for s in first] == [str(tmp_path / "a.xyz")]
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1
    np.testing.assert_array_equal(again[0].force[3], first[0].force[3])
