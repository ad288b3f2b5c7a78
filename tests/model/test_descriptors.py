import pytest
import torch
from physics import PotentialContract

from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel


def _randomize_stats(model, seed=0):
    """Non-trivial mean/std and bias so that normalisation and padding paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("env.mean"):
            # statistics are per centre type, tiled over slots (as deepmd-kit computes them)
            buf.copy_(0.1 * torch.rand(buf.shape[0], 1, 4, generator=g, dtype=torch.float64).expand(buf.shape).to(buf))
            if getattr(model.descriptor.cfg, "set_davg_zero", False):
                buf.zero_()
            buf[..., 1:] = 0
        elif name.endswith("env.stddev"):
            std = 0.5 + torch.rand(buf.shape[0], 1, 2, generator=g, dtype=torch.float64)
            buf.copy_(torch.cat([std[..., :1], std[..., 1:].expand(-1, -1, 3)], -1).expand(buf.shape).to(buf))
        elif name == "out_bias":
            buf.copy_(torch.tensor([-3.0, -1.0, -7.0]).to(buf))
    return model


class TestSeE2A(PotentialContract):
    def make_model(self, dtype=torch.float64):
        prec = "float64" if dtype == torch.float64 else "float32"
        cfg = ModelConfig(
            type_map=self.type_map,
            descriptor={"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [30, 60, 30], "neuron": [4, 8, 16],
                        "axis_neuron": 4, "seed": 1, "precision": prec, "resnet_dt": True},
            fitting_net={"neuron": [16, 16], "seed": 2, "precision": prec},
        )
        return _randomize_stats(EnergyModel(cfg))


class TestSeE2ATypeOneSide(TestSeE2A):
    def make_model(self, dtype=torch.float64):
        prec = "float64" if dtype == torch.float64 else "float32"
        cfg = ModelConfig(
            type_map=self.type_map,
            descriptor={"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 1.0, "sel": [30, 60, 30], "neuron": [4, 8],
                        "axis_neuron": 2, "seed": 3, "type_one_side": True, "precision": prec},
            fitting_net={"neuron": [8], "seed": 4, "precision": prec},
        )
        return _randomize_stats(EnergyModel(cfg))


class TestSeAtten(PotentialContract):
    def make_model(self, dtype=torch.float64):
        prec = "float64" if dtype == torch.float64 else "float32"
        cfg = ModelConfig(
            type_map=self.type_map,
            descriptor={"type": "se_atten", "rcut": 4.0, "rcut_smth": 0.5, "sel": 120, "neuron": [4, 8, 16],
                        "axis_neuron": 4, "tebd_dim": 4, "attn": 8, "attn_layer": 2, "seed": 1, "precision": prec},
            fitting_net={"neuron": [16, 16], "seed": 2, "precision": prec},
        )
        return _randomize_stats(EnergyModel(cfg))


class TestSeAttenV2Strip(PotentialContract):
    def make_model(self, dtype=torch.float64):
        prec = "float64" if dtype == torch.float64 else "float32"
        cfg = ModelConfig(
            type_map=self.type_map,
            descriptor={"type": "se_atten_v2", "rcut": 4.0, "rcut_smth": 0.5, "sel": 120, "neuron": [4, 8],
                        "axis_neuron": 4, "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 5, "precision": prec,
                        "set_davg_zero": False, "type_one_side": True},
            fitting_net={"neuron": [8], "seed": 6, "precision": prec},
        )
        return _randomize_stats(EnergyModel(cfg))


def test_se_atten_without_smoothing_is_discontinuous_at_rcut():
    """deepmd-kit's smooth_type_embedding=false masks attention: the energy jumps at rcut."""
    t = TestSeAtten()
    cfg = ModelConfig(type_map=t.type_map,
                      descriptor={"type": "se_atten", "rcut": 4.0, "sel": 40, "neuron": [4, 8], "axis_neuron": 2,
                      "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 1, "smooth_type_embedding": False},
                      fitting_net={"neuron": [8], "seed": 2})
    model = _randomize_stats(EnergyModel(cfg))
    import numpy as np

    from lamflow.model.nn.infer import evaluate
    base = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 3.999999, 0.0]])
    e_in = evaluate(model, base[None], None, np.array([0, 1, 2]))["energy"][0]
    base[2, 1] = 4.000001
    e_out = evaluate(model, base[None], None, np.array([0, 1, 2]))["energy"][0]
    assert abs(e_in - e_out) > 1e-6


@pytest.mark.parametrize("type_one_side", [True, False])
def test_se_e2_a_real_neighbour_embedding_equals_evaluating_every_slot(type_one_side, monkeypatch):
    """The fast path (nets on real neighbours, one evaluation per empty-slot input) is exact."""
    import numpy as np
    from physics import chon_frame

    from lamflow.model.nn.descriptor.se_e2_a import SeE2A
    from lamflow.model.nn.infer import evaluate

    t = TestSeE2A()
    cfg = ModelConfig(type_map=t.type_map, descriptor={"type": "se_e2_a", "rcut": 4.0, "sel": [8, 12, 8], "neuron": [4, 8],
                      "axis_neuron": 2, "seed": 1, "type_one_side": type_one_side}, fitting_net={"neuron": [8], "seed": 2})
    model = _randomize_stats(EnergyModel(cfg))
    assert model.descriptor._stats_tiled()
    coord, _, atype = chon_frame()
    fast = evaluate(model, coord[None], None, t._map(atype))
    monkeypatch.setattr(SeE2A, "_stats_tiled", lambda self: False)
    slow = evaluate(model, coord[None], None, t._map(atype))
    assert abs(fast["energy"][0] - slow["energy"][0]) < 1e-12
    np.testing.assert_allclose(fast["force"], slow["force"], atol=1e-12)
