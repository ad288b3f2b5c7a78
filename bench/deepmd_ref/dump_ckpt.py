#!/usr/bin/env python
"""Print the layout of a deepmd-kit (PyTorch backend) checkpoint ``model.ckpt.pt``.

    $DPY bench/deepmd_ref/dump_ckpt.py /tmp/dp_ch4/model.ckpt.pt [--config]

Needs only torch (no deepmd import): the checkpoint is a plain ``torch.save`` dict, readable with
``torch.load(..., weights_only=True)``.
"""
import argparse
import json

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--config", action="store_true", help="also print the embedded model_params JSON")
    a = p.parse_args()
    ck = torch.load(a.ckpt, map_location="cpu", weights_only=True)
    print("top-level keys:", {k: type(v).__name__ for k, v in ck.items()})
    sd = ck["model"]
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            print(f"  {k:95s} {str(tuple(v.shape)):16s} {str(v.dtype).replace('torch.', '')}")
        else:
            print(f"  {k:95s} <{type(v).__name__}> keys={list(v) if isinstance(v, dict) else ''}")
    extra = sd.get("_extra_state", {})
    if "train_infos" in extra:
        print("_extra_state.train_infos:", extra["train_infos"])
    if a.config and "model_params" in extra:
        print(json.dumps(extra["model_params"], indent=1, default=str))
    opt = ck.get("optimizer")
    if isinstance(opt, dict):
        print("optimizer keys:", list(opt), "param_groups[0]:",
              {k: v for k, v in opt["param_groups"][0].items() if k != "params"})
    n = sum(v.numel() for k, v in sd.items() if isinstance(v, torch.Tensor))
    print("total tensor elements in state_dict (params + buffers):", n)


if __name__ == "__main__":
    main()
