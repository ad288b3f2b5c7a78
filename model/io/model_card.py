"""A short model card written next to an exported model, the way published Deep Potential models
are described: what the model is (type map, descriptor, cutoffs, size), what it was trained and
tested on with which errors (from the run's JSON, when there is one), which lamflow wrote it, and
the commands that freeze, compress and run it in LAMMPS."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.model.io.files import atomic_write_text

METRIC_ROWS = (("rmse_e_per_atom", "energy RMSE", "meV/atom"), ("rmse_f", "force RMSE", "meV/A"),
               ("rmse_v_per_atom", "virial RMSE", "meV/atom"))


def lamflow_version() -> str:
    try:
        return metadata.version("lamflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def cutoffs(descriptor: dict) -> list[str]:
    """rcut / rcut_smth of every block of a descriptor config (DPA-2 has several)."""
    out = []
    for name, block in [("", descriptor)] + [(k, v) for k, v in descriptor.items() if isinstance(v, dict)]:
        if "rcut" in block:
            where = f"{name} " if name else ""
            out.append(f"{where}rcut {block['rcut']} A (smooth from {block.get('rcut_smth')} A)")
        if block.get("use_three_body"):
            out.append(f"{name} three-body rcut {block['three_body_rcut']} A")
    return out


def _metrics_lines(report: Path | None) -> list[str]:
    if report is None or not report.is_file():
        return ["- no training or test metrics were found next to the checkpoint (pass `--report metrics.json`)"]
    data = json.loads(report.read_text())
    systems = data.get("systems") if isinstance(data.get("systems"), dict) else None
    rows = [("overall", data.get("overall", data))] + (sorted(systems.items()) if systems else [])
    lines = [f"Errors from `{report}`:", "", "| data | " + " | ".join(f"{t} ({u})" for _, t, u in METRIC_ROWS) + " |",
             "|---|" + "---|" * len(METRIC_ROWS)]
    for name, m in rows:
        cells = [f"{1000 * m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-" for k, _, _ in METRIC_ROWS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def card_text(model_file: Path, source: Path, info: dict, report: Path | None) -> str:
    payload = read_checkpoint(source)
    if info.get("compress"):
        payload = payload["parent"]
    cfg = payload["config"]
    desc = cfg["descriptor"]
    nparam = sum(v.numel() for k, v in payload["state_dict"].items() if not k.endswith(("mean", "stddev", "out_bias")))
    frozen = model_file.with_name(model_file.stem + "-frozen.pth")
    mind = info.get("min_nbor_dist")
    head = f" --head {info['branches'][0]}" if info["branches"] != ["Default"] else ""
    comp = info.get("compress") or {"stride": 0.01, "extrapolate": 5, "check_frequency": -1}
    lines = [
        f"# {model_file.name}", "",
        f"A Deep Potential ({desc['type']}) exported by lamflow {lamflow_version()} from `{source}` "
        f"(lamflow kind {info['kind']}) as a deepmd-kit 3.x PyTorch checkpoint.", "",
        "## Model", "",
        f"- type map: {' '.join(info['type_map'])}",
        f"- branches: {', '.join(info['branches'])}",
        f"- descriptor: {desc['type']}; " + "; ".join(cutoffs(desc)),
        f"- fitting net: {cfg.get('fitting_net', {}).get('neuron', [])} (branch heads may differ)",
        f"- parameters: {nparam}",
        f"- min_nbor_dist: {mind:.4f} A" if mind else "- min_nbor_dist: unknown (give `dp compress -t input.json`)",
        "", "## Data and errors", "", *_metrics_lines(report), "",
        "## Use it", "",
        "```sh",
        f"dp --pt freeze -c {model_file.name} -o {frozen.name}{head}",
        f"dp --pt compress -i {frozen.name} -o {frozen.stem}-compressed.pth -s {comp['stride']} -e {comp['extrapolate']}"
        f" -f {comp['check_frequency']}",
        "```", "",
        "LAMMPS (deepmd-kit's plugin, `libdeepmd_lmpplugin.so`, from the deepmd-kit wheel):", "",
        "```",
        "plugin load libdeepmd_lmpplugin.so",
        "units metal",
        "atom_style atomic",
        "read_data conf.lmp",
        f"pair_style deepmd {frozen.name}",
        "pair_coeff * * " + " ".join(info["type_map"]),
        "```", "",
        "`pair_coeff * *` names the element of each LAMMPS atom type, in the data file's type order.", "",
    ]
    return "\n".join(lines)


def write_card(model_file: str | os.PathLike, source: str | os.PathLike, info: dict,
               report: str | os.PathLike | None = None) -> Path:
    model_file, source = Path(model_file), Path(source)
    report = Path(report) if report else source.parent / "train.json"
    card = model_file.with_suffix(".md")
    atomic_write_text(card, card_text(model_file, source, info, report))
    return card
