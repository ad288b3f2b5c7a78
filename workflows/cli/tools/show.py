"""`lamflow show MODEL [--json]` (deepmd-kit's `dp show`): type map, branches, descriptor and
fitting sizes, parameter counts, observed types and cutoffs of a lamflow checkpoint or a deepmd-kit
`.pt` file. Observed types of a branch: the elements whose energy bias is non-zero (the bias fit
leaves an element the training data never had at 0)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("show", help="type map, branches, sizes, parameter counts, observed types and cutoffs of a model")
    p.add_argument("model", type=Path, help="lamflow checkpoint or deepmd-kit .pt")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.training.pretrained import read_model as load_any

    model, payload = load_any(args.model)
    info = model_info(model, payload, str(args.model))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model: {info['source']}  (kind {info['kind']}, {info['precision']})" +
          (f", imported from deepmd-kit {info['imported_from']}" if info.get("imported_from") else ""))
    print(f"type map ({len(info['type_map'])}): {' '.join(info['type_map'])}")
    d = info["descriptor"]
    print(f"descriptor: {d['type']}  rcut {d['rcut']}" + (f"  inner cutoffs {d['inner_rcuts']}" if d["inner_rcuts"] else "")
          + f"  sel {d['sel']}  dim_out {d['dim_out']}  parameters {d['parameters']:,d}")
    for name, b in info["branches"].items():
        print(f"branch {name} ({b['task']}): fitting {b['fitting_neuron']}  parameters {b['parameters']:,d}  "
              f"observed types {' '.join(b['observed_types']) or '-'}")
    print(f"parameters: {info['parameters']:,d}")
    return 0


def _inner_rcuts(cfg) -> dict:
    if cfg.type == "dpa2":
        out = {"repinit": cfg.repinit.rcut, "repformer": cfg.repformer.rcut}
        if cfg.repinit.use_three_body:
            out["three_body"] = cfg.repinit.three_body_rcut
        return out
    if cfg.type == "dpa3":
        return {"e_rcut": cfg.repflow.e_rcut, "a_rcut": cfg.repflow.a_rcut}
    return {}


def model_info(model, payload: dict, source: str) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tm = list(model.type_map)
    dcfg = model.cfg.descriptor
    heads = getattr(model, "heads", None)
    if heads is not None:
        parts = {n: (h.task, model.heads[n], h.fitting_net) for n, h in model.cfg.branches.items()}
    else:
        parts = {"default": ("ener", model.fitting, model.cfg.fitting_net)}
    branches = {}
    for name, (task, module, fit) in parts.items():
        bias = getattr(module, "out_bias", getattr(model, "out_bias", None)) if task == "ener" else None
        branches[name] = {"task": task, "fitting_neuron": list(fit.neuron), "parameters": count(module),
                          "observed_types": [] if bias is None else [e for e, b in zip(tm, bias.tolist()) if b != 0.0]}
    return {
        "source": source, "kind": model.kind, "precision": model.cfg.dtype_name, "type_map": tm,
        "imported_from": (payload.get("imported_from") or {}).get("deepmd_checkpoint"),
        "descriptor": {"type": dcfg.type, "rcut": dcfg.rcut, "inner_rcuts": _inner_rcuts(dcfg),
                       "sel": [list(r.sel) for r in model.nlist_requests()], "dim_out": model.descriptor.dim_out,
                       "parameters": count(model.descriptor), "config": dcfg.model_dump(mode="json")},
        "branches": branches, "parameters": count(model),
    }
