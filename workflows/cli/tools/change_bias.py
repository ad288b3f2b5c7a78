"""`lamflow change-bias MODEL (-s DATA... | -b E1 E2 ...) [--branch B] [-m change|set] -o OUT`
(deepmd-kit's `dp change-bias`).

Re-fits the per-element energy bias of a model (a lamflow checkpoint or a deepmd-kit `.pt`, any
branch of a multi-task one) and writes a lamflow checkpoint; every other weight is untouched.
  -s DATA ...  least squares on the data's energies: `change` (default) b += argmin |N db - (E - E_model)|,
               `set` b = argmin |N b - (E - E_net)| (the net's energy without bias); N = atom counts
  -b E1 E2 ... the bias itself, one value per element of the model's type map, in its order
"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("change-bias", help="re-fit (or set) the per-element energy bias of a model")
    p.add_argument("model", type=Path, help="lamflow checkpoint or deepmd-kit .pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-s", "--system", nargs="+", help="labelled data (deepmd/npy folders) to fit the bias on")
    src.add_argument("-b", "--bias", nargs="+", type=float, help="bias per element of the type map, in its order (eV)")
    p.add_argument("--branch", help="branch of a multi-task model (default: its only energy branch)")
    p.add_argument("-m", "--mode", choices=("change", "set"), default="change",
                   help="change: shift the bias by a fit on the residual (default); set: fit it on E - E_net")
    p.add_argument("-o", "--output", type=Path, required=True, help="output lamflow checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.io.payload import save_model
    from lamflow.model.training.pretrained import read_model as load_any

    model, _ = load_any(args.model)
    new = change_model_bias(model, args.system, args.bias, args.branch, args.mode == "change", str(args.model))
    save_model(model, args.output)
    print(f"wrote {args.output}; energy bias {new}")
    return 0


def change_model_bias(model, systems, bias, branch, keep: bool, source: str) -> dict:
    """Change the bias of `model` (EnergyModel, or branch `branch` of a MultiTaskModel) in place;
    returns {element: new bias}."""
    import torch

    from lamflow.model.data.systems import load_systems
    from lamflow.model.errors import ConfigError
    from lamflow.model.training.pretrained import change_bias

    target = model
    if model.kind == "multitask":
        branch = model.resolve_branch(branch)
        target = model.branch_model(branch)
    elif branch is not None:
        raise ConfigError(f"{source}: a single-task model has no branch {branch!r}")
    tm = list(target.type_map)
    if bias is not None:
        if len(bias) != len(tm):
            raise ConfigError(f"-b: {len(bias)} values for the {len(tm)} elements of the type map {tm}")
        target.out_bias.copy_(torch.tensor(bias, dtype=target.out_bias.dtype))
    else:
        data = [s for s in load_systems(list(systems), tm) if s.energy is not None]
        if not data:
            raise ConfigError(f"-s: no energy labels in {' '.join(systems)}")
        change_bias(target, data, keep, log=lambda *a: None)
    if target is not model:
        model.heads[branch].out_bias.copy_(target.out_bias)
    return {e: round(float(b), 6) for e, b in zip(tm, target.out_bias.tolist())}
