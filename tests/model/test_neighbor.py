"""batch_graph (torch, per batch) against the cKDTree reference (build_graph per frame): the same
neighbours, image shifts and distance order on every shared dataset, small and triclinic cells,
mixed batches; overflow naming the frame; truncation; and identical energies/forces."""

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_DATA, SHARED_DATA

from lamflow.model.data.batch import collate, frame_graph
from lamflow.model.data.batch_neighbors import batch_graph, batch_graph_reference
from lamflow.model.data.neighbor import NeighborOverflow, NlistRequest, find_pairs, neighbor_counts
from lamflow.model.data.systems import System, find_systems, load_system
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel, predict

TYPE_MAP = ["O", "H", "C", "N", "Si", "I", "Pb"]
FRAMES = 3  # a handful of frames per system


def ext_coord(coord, box, pbc, g):
    """[nf, nall, 3] extended coordinates of a BatchGraph."""
    ce = torch.gather(coord, 1, g.mapping[..., None].expand(-1, -1, 3))
    if box is not None:
        ce = ce + g.shift @ torch.where(pbc[:, None, None], box, torch.zeros_like(box))
    return ce


def _slot_keys(coord, box, pbc, g, nl):
    """Per slot: distance to the centre (inf when empty) and an integer key of (local atom, image shift
    relative to the centre); a neighbour is the same physical atom iff the keys agree."""
    nf, nloc, nnei = nl.shape
    ce = ext_coord(coord, box, pbc, g)
    j = nl.clamp(min=0).reshape(nf, -1)
    pos = torch.gather(ce, 1, j[..., None].expand(-1, -1, 3)).reshape(nf, nloc, nnei, 3)
    d = (pos - ce[:, :nloc, None]).norm(dim=-1)
    m = torch.gather(g.mapping, 1, j).reshape(nf, nloc, nnei)
    shift_j = torch.gather(g.shift, 1, j[..., None].expand(-1, -1, 3)).reshape(nf, nloc, nnei, 3)
    rel = (shift_j - g.shift[:, :nloc, None]).round().long()
    key = m * 10**9 + (rel[..., 0] + 500) * 10**6 + (rel[..., 1] + 500) * 10**3 + (rel[..., 2] + 500)
    empty = nl < 0
    return d.masked_fill(empty, torch.inf).numpy(), key.masked_fill(empty, 2**62).numpy(), empty.numpy()


def assert_same_lists(coord, atype, box, pbc, requests, got, ref, tol=1e-9):
    """Per frame, centre, request and block: the same neighbours as (local atom, image shift relative to
    the centre), each block sorted by distance with its empty slots last (so the order agrees up to
    ties), and the same distances slot by slot."""
    real = (atype >= 0).numpy()
    for req, ng, nr in zip(requests, got.nlists, ref.nlists):
        assert ng.shape == nr.shape
        bounds = np.cumsum((0,) + tuple(req.sel))
        dg, kg, eg = _slot_keys(coord, box, pbc, got, ng)
        dr, kr, er = _slot_keys(coord, box, pbc, ref, nr)
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            for d, e in ((dg, eg), (dr, er)):
                assert not (e[..., b0:b1 - 1] & ~e[..., b0 + 1:b1]).any(), "empty slots only at the end of a block"
                assert not (np.diff(np.where(e, 1e300, d)[..., b0:b1], axis=-1) < -1e-12).any(), "sorted by distance"
            np.testing.assert_array_equal(eg[real][:, b0:b1], er[real][:, b0:b1])
            np.testing.assert_allclose(np.where(eg, 0, dg)[real][:, b0:b1], np.where(er, 0, dr)[real][:, b0:b1], atol=tol)
            np.testing.assert_array_equal(np.sort(kg[real][:, b0:b1], axis=-1), np.sort(kr[real][:, b0:b1], axis=-1))
    # padded local slots map to themselves, have no neighbours and are nobody's neighbour
    pad = atype < 0
    nloc = atype.shape[1]
    assert torch.equal(got.mapping[:, :nloc], torch.arange(nloc).expand_as(atype))
    for n in got.nlists:
        assert (n[pad] == -1).all()
        for f in range(atype.shape[0]):
            assert not np.isin(n[f].numpy(), np.nonzero(pad[f].numpy())[0]).any()


def batch_of(items):
    """(coord, atype, box, pbc) of frames [(System, k)], padded as collate pads them (real atoms first)."""
    nf, nloc = len(items), max(s.natoms for s, _ in items)
    coord, atype = torch.zeros(nf, nloc, 3, dtype=torch.float64), torch.full((nf, nloc), -1)
    box = torch.zeros(nf, 3, 3, dtype=torch.float64)
    for f, (s, k) in enumerate(items):
        coord[f, : s.natoms] = torch.as_tensor(s.coord[k])
        atype[f, : s.natoms] = torch.as_tensor(s.atype)
        if s.box is not None:
            box[f] = torch.as_tensor(s.box[k])
    return coord, atype, box, torch.tensor([s.box is not None for s, _ in items])


def requests_for(systems, rcuts=(6.0, 3.5)):
    """A mixed list at the largest rcut, a typed and a mixed one at the smaller (sel = max count + 2 or + 1)."""
    ntypes = len(TYPE_MAP)
    cmax = {r: np.zeros(ntypes, dtype=int) for r in rcuts}
    tmax = {r: 0 for r in rcuts}
    for s in systems:
        for k in range(min(FRAMES, s.nframes)):
            p = find_pairs(s.coord[k], None if s.box is None else s.box[k], max(rcuts))
            for r in rcuts:
                c = neighbor_counts(p, s.atype, s.natoms, ntypes, r)
                cmax[r] = np.maximum(cmax[r], c.max(0))
                tmax[r] = max(tmax[r], int(c.sum(1).max()))
    return [NlistRequest(rcuts[0], (tmax[rcuts[0]] + 2,), True),
            NlistRequest(rcuts[1], tuple(int(c) + 2 for c in cmax[rcuts[1]]), False),
            NlistRequest(rcuts[1], (tmax[rcuts[1]] + 1,), True)]


DATA = SHARED_DATA if SHARED_DATA.is_dir() else EXAMPLE_DATA  # the bundled minis when ../shared is absent


def shared_systems() -> dict[str, list[System]]:
    """dataset folder -> its systems (first FRAMES frames of each)."""
    out = {}
    for p in sorted(find_systems(DATA)):
        for s in load_system(p, TYPE_MAP):
            out.setdefault(p.relative_to(DATA).parts[0], []).append(s.subset(range(min(FRAMES, s.nframes))))
    return out


@pytest.fixture(scope="module")
def datasets():
    return shared_systems()


def pick(datasets, prefix: str) -> System:
    return next(v[0] for k, v in datasets.items() if k.startswith(prefix))


def check(items, requests, truncate=False):
    coord, atype, box, pbc = batch_of(items)
    got = batch_graph(coord, atype, box, pbc, requests, truncate=truncate, method="torch")
    ref = batch_graph_reference(coord, atype, box, pbc, requests, truncate=truncate)
    assert got.mapping.dtype == torch.long and got.shift.dtype == coord.dtype
    assert_same_lists(coord, atype, box, pbc, requests, got, ref)
    return got


def test_every_shared_dataset_matches_the_ckdtree_lists(datasets):
    if DATA == SHARED_DATA:
        assert {"water_h2o", "chon_nopbc", "si_pbe", "mapbi3_scan", "ch4_pbe", "water_dplr_384"} <= set(datasets)
    for systems in datasets.values():
        for s in systems:
            check([(s, k) for k in range(s.nframes)], requests_for([s]))


def _triclinic_small(s: System, scale=1.0):
    """The frames of s in a sheared cell (same fractional coordinates), atoms moved out of the cell by
    whole cell vectors so that wrapping is exercised."""
    rng = np.random.default_rng(0)
    box = s.box.copy() * scale
    box[:, 1] += 0.3 * box[:, 0]
    box[:, 2] += -0.2 * box[:, 0] + 0.25 * box[:, 1]
    frac = np.einsum("fij,fjk->fik", s.coord, np.linalg.inv(s.box))
    frac = frac + rng.integers(-2, 3, size=frac.shape)
    return System(s.name + "[triclinic]", s.elements, s.atype, np.einsum("fij,fjk->fik", frac, box), box)


def test_cells_smaller_than_two_rcut_and_triclinic(datasets):
    si = pick(datasets, "si_pbe")
    ch4 = pick(datasets, "ch4_pbe")
    assert np.linalg.norm(si.box[0], axis=1).max() < 12.0  # 64 Si atoms, cell < 2 * 6.5 Angstrom
    for s, rcuts in ((si, (6.5, 4.0)), (_triclinic_small(si), (6.5, 4.0)), (_triclinic_small(ch4, 0.5), (7.3, 4.6))):
        reqs = requests_for([s], rcuts)
        got = check([(s, k) for k in range(s.nframes)], reqs)
        assert got.mapping.shape[1] > 4 * s.natoms  # many images of each atom


def test_mixed_batch_of_periodic_and_non_periodic_frames_of_different_sizes(datasets):
    water = pick(datasets, "water_h2o")
    chon = pick(datasets, "chon_nopbc")
    si = pick(datasets, "si_pbe")
    items = [(chon, 0), (water, 1), (si, 2), (chon, 2)]
    got = check(items, requests_for([water, chon, si]))
    coord, atype, box, pbc = batch_of(items)
    assert got.mapping.device == coord.device and got.shift.dtype == torch.float64
    assert (got.shift[0] == 0).all() and (got.shift[3] == 0).all()  # non-periodic: no images
    assert (got.mapping[0, chon.natoms:atype.shape[1]] == torch.arange(chon.natoms, atype.shape[1])).all()
    # a batch without any periodic frame may come without a box
    coord, atype, _, pbc = batch_of([(chon, 0), (chon, 1)])
    reqs = requests_for([chon])
    got = batch_graph(coord, atype, None, pbc, reqs, method="torch")
    assert got.mapping.shape[1] == atype.shape[1] and (got.shift == 0).all()
    assert_same_lists(coord, atype, None, pbc, reqs, got, batch_graph_reference(coord, atype, None, pbc, reqs))


def test_overflow_names_the_frame_and_truncate_keeps_the_nearest(datasets):
    chon = pick(datasets, "chon_nopbc")
    si = pick(datasets, "si_pbe")
    reqs = [NlistRequest(5.0, (12,), True), NlistRequest(3.0, tuple([4] * len(TYPE_MAP)), False),
            NlistRequest(2.6, (3,), True)]
    items = [(chon, 0), (chon, 1), (si, 1)]
    coord, atype, box, pbc = batch_of(items)
    with pytest.raises(NeighborOverflow) as e:
        batch_graph(coord, atype, box, pbc, reqs, method="torch")
    assert e.value.frame == 2
    with pytest.raises(NeighborOverflow) as rr:
        batch_graph_reference(coord, atype, box, pbc, reqs)
    assert (e.value.frame, e.value.atom, e.value.counts.tolist()) == (rr.value.frame, rr.value.atom, rr.value.counts.tolist())
    assert "frame 2" in str(e.value)
    got = check(items, reqs, truncate=True)
    assert (got.nlists[0][2, : si.natoms] >= 0).all()  # full lists, the nearest 12
    assert (got.nlists[2][2, : si.natoms] >= 0).all()  # the 3 nearest of the (4) within 2.6


@pytest.mark.parametrize("descriptor", [
    {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [30, 60, 10], "neuron": [4, 8], "axis_neuron": 2, "seed": 1},
    {"type": "dpa2", "seed": 1,
     "repinit": {"rcut": 4.0, "rcut_smth": 0.5, "nsel": 80, "neuron": [4, 8], "axis_neuron": 2, "tebd_dim": 4,
                 "use_three_body": True, "three_body_rcut": 3.5, "three_body_rcut_smth": 0.5, "three_body_sel": 40,
                 "three_body_neuron": [2, 4]},
     "repformer": {"rcut": 3.0, "rcut_smth": 1.0, "nsel": 40, "nlayers": 1, "g1_dim": 8, "g2_dim": 4, "axis_neuron": 2,
                   "attn1_hidden": 4, "attn1_nhead": 1, "attn2_hidden": 4, "attn2_nhead": 1}},
], ids=["se_e2_a", "dpa2"])
def test_energy_model_gives_the_same_energies_and_forces(datasets, descriptor):
    water = pick(datasets, "water_h2o")
    chon = pick(datasets, "chon_nopbc")
    tm = ["O", "H", "C"]
    model = EnergyModel(ModelConfig(type_map=tm, descriptor={**descriptor, "precision": "float64"},
                                    fitting_net={"neuron": [8], "seed": 2, "precision": "float64"}))
    model.out_bias.copy_(torch.tensor([-3.0, -1.0, -7.0], dtype=torch.float64))
    reqs = model.nlist_requests()
    items = [(water, 0), (chon, 1), (water, 2)]  # O, H, C are types 0-2 of TYPE_MAP as of tm
    batch = collate([(s, k, frame_graph(s, k, reqs)) for s, k in items], torch.float64)
    pbc = torch.tensor([s.box is not None for s, _ in items])
    g = batch_graph(batch.coord, batch.atype, batch.box, pbc, reqs, method="torch")
    ref = predict(model, batch, forces=True, virial=True)
    batch.mapping, batch.shift, batch.nlists = g.mapping, g.shift, g.nlists
    out = predict(model, batch, forces=True, virial=True)
    torch.testing.assert_close(out.energy, ref.energy, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.force, ref.force, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.virial, ref.virial, rtol=0, atol=1e-12)
