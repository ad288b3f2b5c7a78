"""Make tests/data/dpa2_deepmd_3.2.0.npz: deepmd-kit 3.2.0's DPA-2 descriptor on random periodic
frames, for tests/model/test_dpa2.py::test_dpa2_matches_deepmd_kit_descriptor_and_gradient.

Runs in a virtualenv with deepmd-kit 3.2.0 (not ours):
    $HOME/.cache/lamflow/deepmd-venv/bin/python tests/data/make_dpa2_reference.py tests/data/dpa2_deepmd_3.2.0.npz
Each option set stores its descriptor kwargs (JSON), the module's state_dict (weights perturbed
away from their initial values, random env-matrix statistics), deepmd-kit's own extended
coordinates, types, mapping and the two neighbour lists, the descriptor g1 and d(sum g1^2)/d(coord_ext).
"""

import json
import sys

import numpy as np
import torch
from deepmd.pt.model.descriptor.dpa2 import DescrptDPA2
from deepmd.pt.utils.nlist import build_multiple_neighbor_list, extend_input_and_build_neighbor_list, get_multiple_nlist_key

SMALL = dict(rcut=3.0, rcut_smth=1.0, nsel=24, g1_dim=8, g2_dim=4, axis_neuron=2, attn1_hidden=4, attn2_hidden=3)
CASES = {
    "res_avg_concat_gate_h2": dict(
        repinit=dict(rcut=4.0, rcut_smth=0.5, nsel=48, neuron=[4, 8], axis_neuron=3, tebd_dim=4, use_three_body=True,
                     three_body_rcut=3.5, three_body_rcut_smth=0.5, three_body_sel=30, three_body_neuron=[2, 4]),
        repformer=dict(SMALL, nlayers=3, g1_dim=10, g2_dim=6, axis_neuron=3, update_h2=True, attn2_has_gate=True,
                       attn1_nhead=2, attn2_nhead=2)),
    "res_residual_strip_direct_dist": dict(
        repinit=dict(rcut=4.0, rcut_smth=0.5, nsel=48, neuron=[4, 8], axis_neuron=2, tebd_dim=4, tebd_input_mode="strip",
                     type_one_side=True, activation_function="gelu", use_three_body=True, three_body_rcut=3.5,
                     three_body_rcut_smth=1.0, three_body_sel=30, three_body_neuron=[3, 6]),
        repformer=dict(SMALL, nlayers=3, g1_dim=16, direct_dist=True, g1_out_conv=False, g1_out_mlp=False, update_h2=True,
                       update_style="res_residual", attn1_nhead=3, attn2_nhead=3, activation_function="silu"),
        add_tebd_to_repinit_out=True, use_tebd_bias=True, concat_output_tebd=False),
    "res_incr_not_smooth": dict(
        repinit=dict(rcut=4.0, rcut_smth=0.5, nsel=48, neuron=[4, 8], axis_neuron=2, tebd_dim=4, tebd_input_mode="strip"),
        repformer=dict(SMALL, nlayers=2, use_sqrt_nnei=False, update_style="res_incr", attn1_nhead=2, attn2_nhead=1),
        smooth=False),
    "res_residual_const_no_attention": dict(
        repinit=dict(rcut=4.0, rcut_smth=0.5, nsel=48, neuron=[4, 8], axis_neuron=2, tebd_dim=4),
        repformer=dict(SMALL, nlayers=2, update_g1_has_attn=False, update_g2_has_attn=False, update_g2_has_g1g1=False,
                       update_h2=True, update_style="res_residual", update_residual_init="const", update_residual=0.3,
                       attn2_nhead=2, trainable_ln=False, ln_eps=1e-3)),
}


def main(out: str) -> None:
    arrays = {}
    for n, (name, kw) in enumerate(CASES.items()):
        d = DescrptDPA2(3, precision="float64", seed=1, **kw)
        g = torch.Generator().manual_seed(100 + n)
        with torch.no_grad():
            for p in d.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            d.repinit.mean.zero_()  # set_davg_zero, where concat-mode padding agrees (see dpa2.py)
            if d.use_three_body:  # only the angular columns enter, whose mean is zero in deepmd-kit's statistics
                d.repinit_three_body.mean.copy_(0.2 * torch.randn(d.repinit_three_body.mean.shape, generator=g,
                                                                  dtype=torch.float64))
                d.repinit_three_body.mean[..., 1:] = 0
                d.repinit_three_body.stddev.copy_(0.5 + torch.rand(d.repinit_three_body.stddev.shape, generator=g,
                                                                   dtype=torch.float64))
            d.repinit.stddev.copy_(0.5 + torch.rand(d.repinit.stddev.shape, generator=g, dtype=torch.float64))
            d.repformers.mean.copy_(0.2 * torch.randn(d.repformers.mean.shape, generator=g, dtype=torch.float64))
            d.repformers.stddev.copy_(0.5 + torch.rand(d.repformers.stddev.shape, generator=g, dtype=torch.float64))
        box = torch.tensor([[[4.6, 0, 0], [0.5, 4.4, 0], [0.2, -0.3, 4.5]]], dtype=torch.float64)
        coord = torch.rand(1, 7, 3, generator=g, dtype=torch.float64) @ box
        atype = torch.randint(0, 3, (1, 7), generator=g)
        ext, ext_t, mapping, nlist = extend_input_and_build_neighbor_list(
            coord, atype, d.get_rcut(), d.get_sel(), mixed_types=True, box=box.reshape(1, 9))
        nd = build_multiple_neighbor_list(ext, nlist, d.rcut_list, d.nsel_list)
        ext = ext.detach().requires_grad_(True)
        g1 = d(ext, ext_t, nlist, mapping)[0]
        (grad,) = torch.autograd.grad((g1**2).sum(), ext)
        arrays[f"{name}/kwargs"] = np.array(json.dumps(kw))
        for k, v in d.state_dict().items():
            if v.numel() and "._networks." not in k:  # _networks duplicates networks
                arrays[f"{name}/state/{k}"] = v.numpy()
        arrays[f"{name}/coord_ext"] = ext.detach().numpy()
        arrays[f"{name}/atype_ext"] = ext_t.numpy()
        arrays[f"{name}/mapping"] = mapping.numpy()
        arrays[f"{name}/nlist_repinit"] = nd[get_multiple_nlist_key(d.repinit.get_rcut(), d.repinit.get_nsel())].numpy()
        arrays[f"{name}/nlist_repformer"] = nd[get_multiple_nlist_key(d.repformers.get_rcut(), d.repformers.get_nsel())].numpy()
        if d.use_three_body:
            three = d.repinit_three_body
            arrays[f"{name}/nlist_three_body"] = nd[get_multiple_nlist_key(three.get_rcut(), three.get_nsel())].numpy()
        arrays[f"{name}/g1"] = g1.detach().numpy()
        arrays[f"{name}/grad"] = grad.numpy()
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
