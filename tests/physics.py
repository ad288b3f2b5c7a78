"""The physics contract every potential must satisfy (NequIP-style mixin).

A test class supplies `make_model(dtype) -> model`; this mixin checks invariances, forces and virial
against finite differences, smoothness at rcut, periodic images, locality and batching.
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.nn.infer import evaluate


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def water_frame():
    s = load_systems(str(data_path("water_h2o", "valid")), ["O", "H"])[0]
    return s.coord[0], s.box[0], s.atype


def chon_frame():
    s = load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])[0]
    return s.coord[0], None, s.atype


class PotentialContract:
    type_map: list[str] = ["C", "H", "O"]
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}

    def energy(self, model, coord, box, atype):
        return evaluate(model, coord[None], None if box is None else box[None], atype)

    def test_energy_invariant_under_rotation_translation_permutation(self):
        model = self.make_model(torch.float64)
        rng = np.random.default_rng(0)
        for coord, box, atype in (self._small_periodic(), chon_frame()):
            atype = self._map(atype)
            ref = self.energy(model, coord, box, atype)
            rot = random_rotation(rng)
            shift = rng.normal(size=3) * 3.0
            out = self.energy(model, coord @ rot.T + shift, None if box is None else box @ rot.T, atype)
            assert abs(out["energy"][0] - ref["energy"][0]) < 1e-10 * max(1, abs(ref["energy"][0]))
            np.testing.assert_allclose(out["force"][0], ref["force"][0] @ rot.T, atol=1e-10)
            perm = rng.permutation(len(atype))
            outp = self.energy(model, coord[perm], box, atype[perm])
            assert abs(outp["energy"][0] - ref["energy"][0]) < 1e-10 * max(1, abs(ref["energy"][0]))
            np.testing.assert_allclose(outp["force"][0], ref["force"][0][perm], atol=1e-10)

    def test_forces_and_virial_match_finite_difference_float64(self):
        model = self.make_model(torch.float64)
        coord, box, atype = self._small_periodic()
        atype = self._map(atype)
        ref = self.energy(model, coord, box, atype)
        h = 1e-5
        for i in range(min(4, len(coord))):
            for a in range(3):
                cp, cm = coord.copy(), coord.copy()
                cp[i, a] += h
                cm[i, a] -= h
                e_plus, e_minus = self.energy(model, cp, box, atype)["energy"][0], self.energy(model, cm, box, atype)["energy"][0]
                fd = -(e_plus - e_minus) / (2 * h)
                assert abs(fd - ref["force"][0][i, a]) < 1e-6, (i, a, fd, ref["force"][0][i, a])
        # virial W_ab = -dE/d(eps_ab) under r -> r (1 + eps)^T, box likewise
        W = np.zeros((3, 3))
        for a in range(3):
            for b in range(3):
                e = np.zeros((3, 3))
                e[a, b] = h
                Ep = self.energy(model, coord @ (np.eye(3) + e).T, box @ (np.eye(3) + e).T, atype)["energy"][0]
                Em = self.energy(model, coord @ (np.eye(3) - e).T, box @ (np.eye(3) - e).T, atype)["energy"][0]
                W[a, b] = -(Ep - Em) / (2 * h)
        np.testing.assert_allclose(ref["virial"][0].reshape(3, 3), W, atol=1e-6)

    def test_energy_smooth_as_neighbour_crosses_rcut(self):
        model = self.make_model(torch.float64)
        rcut = model.descriptor.cfg.rcut if hasattr(model.descriptor, "cfg") else model.rcut
        t = self._map(np.array([0, 1, 2]))
        base = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
        xs = rcut + np.linspace(-1e-3, 1e-3, 21)
        es, fs = [], []
        for x in xs:
            c = base.copy()
            c[2] = [0.0, x, 0.0]
            out = self.energy(model, c, None, t)
            es.append(out["energy"][0])
            fs.append(out["force"][0][2, 1])
        es, fs = np.array(es), np.array(fs)
        # continuous energy and force across rcut; beyond rcut the far atom feels nothing
        assert np.max(np.abs(np.diff(es))) < 1e-7
        assert np.max(np.abs(np.diff(fs))) < 1e-5
        assert np.all(np.abs(fs[xs > rcut]) < 1e-12)

    def test_supercell_energy_is_n_times_unit_cell(self):
        model = self.make_model(torch.float64)
        coord, box, atype = self._small_periodic()
        atype = self._map(atype)
        e1 = self.energy(model, coord, box, atype)
        reps = [(i, j, k) for i in range(2) for j in range(2) for k in range(1)]
        sc = np.concatenate([coord + np.array(r) @ box for r in reps])
        sbox = box * np.array([2, 2, 1])[:, None]
        e4 = self.energy(model, sc, sbox, np.tile(atype, len(reps)))
        assert abs(e4["energy"][0] - len(reps) * e1["energy"][0]) < 1e-9 * len(reps) * max(1, abs(e1["energy"][0]))
        np.testing.assert_allclose(e4["force"][0][: len(coord)], e1["force"][0], atol=1e-10)

    def test_far_apart_molecules_add_energies(self):
        model = self.make_model(torch.float64)
        coord, _, atype = chon_frame()
        atype = self._map(atype)
        e = self.energy(model, coord, None, atype)["energy"][0]
        both = np.concatenate([coord, coord + np.array([50.0, 0, 0])])
        e2 = self.energy(model, both, None, np.concatenate([atype, atype]))["energy"][0]
        assert abs(e2 - 2 * e) < 1e-10 * max(1, abs(e))

    def test_frames_in_a_batch_do_not_share_gradients(self):
        model = self.make_model(torch.float64)
        s = load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])[0]
        atype = self._map(s.atype)
        both = evaluate(model, s.coord[:3], None, atype, batch_size=3)
        for k in range(3):
            one = evaluate(model, s.coord[k : k + 1], None, atype)
            np.testing.assert_allclose(both["force"][k], one["force"][0], atol=1e-12)
            assert abs(both["energy"][k] - one["energy"][0]) < 1e-10

    def test_float32_model_runs_and_agrees_with_float64(self):
        m64 = self.make_model(torch.float64)
        m32 = self.make_model(torch.float32)
        m32.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in m64.state_dict().items()})
        coord, box, atype = chon_frame()
        atype = self._map(atype)
        a, b = self.energy(m64, coord, box, atype), self.energy(m32, coord, box, atype)
        assert abs(a["energy"][0] - b["energy"][0]) < 1e-3 * max(1, abs(a["energy"][0]))
        np.testing.assert_allclose(a["force"][0], b["force"][0], atol=1e-3)

    # -- helpers
    def _map(self, atype):
        """Map C/H/O indices of the fixtures onto this model's type map."""
        names = ["C", "H", "O"]
        return np.array([self.type_map.index(names[t]) for t in atype])

    def _small_periodic(self):
        """A small triclinic C/H/O cell (smaller than 2 rcut) with random but well-separated atoms."""
        rng = np.random.default_rng(7)
        box = np.array([[4.5, 0.0, 0.0], [0.8, 4.2, 0.0], [0.3, -0.5, 4.0]])
        pts = []
        while len(pts) < 6:
            p = rng.random(3) @ box
            ok = True
            for q in pts:
                for img in np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).T.reshape(-1, 3):
                    if np.linalg.norm(p - q - img @ box) < 1.0:
                        ok = False
            if ok:
                pts.append(p)
        return np.array(pts), box, np.array([0, 1, 1, 2, 1, 0])
