"""Make tests/data/dpa3_deepmd_3.2.0.npz: deepmd-kit 3.2.0's DPA-3 descriptor on a random periodic
frame, for tests/model/test_dpa3.py::test_dpa3_matches_deepmd_kit_descriptor_and_gradient.

Runs in a virtualenv with deepmd-kit 3.2.0 (not ours):
    $HOME/.cache/lamflow/deepmd-venv/bin/python tests/data/make_dpa3_reference.py tests/data/dpa3_deepmd_3.2.0.npz
Each option set stores its descriptor kwargs (JSON), the module's state_dict (weights perturbed
away from their initial values; where fix_stat_std is 0, a random std), deepmd-kit's own extended
coordinates, types, mapping and edge list, the descriptor and d(sum D^2)/d(coord_ext).
"""

import json
import sys

import numpy as np
import torch
from deepmd.pt.model.descriptor.dpa3 import DescrptDPA3
from deepmd.pt.utils.nlist import extend_input_and_build_neighbor_list

SMALL = dict(n_dim=8, e_dim=6, a_dim=4, nlayers=2, e_rcut=4.0, e_rcut_smth=0.5, e_sel=32, a_rcut=3.0, a_rcut_smth=0.5,
             a_sel=8, axis_neuron=2)
CASES = {
    # deepmd-kit's defaults: res_residual (const), parallel updates, edge update not smooth
    "default_residual": dict(repflow=dict(SMALL, nlayers=3)),
    # the DPA-3.1 options: split compression, distance edge input, exp switch, dynamic sel, silut
    "dpa31_split_dynamic_exp": dict(
        repflow=dict(SMALL, a_compress_rate=1, a_compress_e_rate=2, a_compress_use_split=True,
                     edge_init_use_dist=True, use_exp_switch=True, smooth_edge_update=True, use_dynamic_sel=True,
                     sel_reduce_factor=4.0, e_rcut_smth=3.5, a_rcut_smth=2.6),
        activation_function="custom_silu:3.0"),
    # linear compression, two edge-message heads, concatenated (unoptimised) updates, res_incr,
    # std from data, tebd bias and concatenated output
    "res_incr_compress_multi_edge_stats": dict(
        repflow=dict(SMALL, a_dim=8, a_compress_rate=2, n_multi_edge_message=2, optim_update=False,
                     update_style="res_incr", fix_stat_std=0.0, smooth_edge_update=True),
        concat_output_tebd=True, use_tebd_bias=True, activation_function="tanh"),
    # sequential updates, norm-initialised residuals, no local mapping
    "sequential_norm": dict(
        repflow=dict(SMALL, sequential_update=True, update_residual_init="norm", update_residual=0.3),
        use_loc_mapping=False),
    # no angle channel, res_avg
    "no_angle_res_avg": dict(repflow=dict(SMALL, update_angle=False, update_style="res_avg", axis_neuron=3)),
}


def main(out: str) -> None:
    arrays = {}
    for n, (name, kw) in enumerate(CASES.items()):
        d = DescrptDPA3(3, precision="float64", seed=1, **kw)
        g = torch.Generator().manual_seed(100 + n)
        with torch.no_grad():
            for p in d.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if kw["repflow"].get("fix_stat_std", 0.3) == 0.0:
                d.repflows.stddev.copy_(0.2 + torch.rand(d.repflows.stddev.shape, generator=g, dtype=torch.float64))
        box = torch.tensor([[[4.6, 0, 0], [0.5, 4.4, 0], [0.2, -0.3, 4.5]]], dtype=torch.float64)
        coord = torch.rand(1, 7, 3, generator=g, dtype=torch.float64) @ box
        atype = torch.randint(0, 3, (1, 7), generator=g)
        ext, ext_t, mapping, nlist = extend_input_and_build_neighbor_list(
            coord, atype, d.get_rcut(), d.get_sel(), mixed_types=True, box=box.reshape(1, 9))
        ext = ext.detach().requires_grad_(True)
        desc = d(ext, ext_t, nlist, mapping)[0]
        (grad,) = torch.autograd.grad((desc**2).sum(), ext)
        arrays[f"{name}/kwargs"] = np.array(json.dumps(kw))
        for k, v in d.state_dict().items():
            if v.numel():
                arrays[f"{name}/state/{k}"] = v.numpy()
        arrays[f"{name}/coord_ext"] = ext.detach().numpy().reshape(1, -1, 3)
        arrays[f"{name}/atype_ext"] = ext_t.numpy()
        arrays[f"{name}/mapping"] = mapping.numpy()
        arrays[f"{name}/nlist"] = nlist.numpy()
        arrays[f"{name}/descriptor"] = desc.detach().numpy()
        arrays[f"{name}/grad"] = grad.numpy().reshape(1, -1, 3)
        print(name, "nlist filled", int((nlist >= 0).sum(-1).max()), "of", nlist.shape[-1])
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
