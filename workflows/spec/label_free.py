"""Label-free datasets in the pipeline: structures without energies and forces (CIF, POSCAR,
extxyz, dpdata formats, deepmd/npy folders without labels) trained as denoise heads of the
pretrain stage (docs/pipeline.md, "Label-free structures").

    datasets:
      ch4:     {train: data/ch4/train, valid: data/ch4/valid}
      crystals: {train: ["structures/*.cif", more/POSCAR], fmt: auto, label_free: true}
    stages:
      pretrain:
        datasets: [ch4, crystals]              # every head, as before
        denoise:                               # which of them are denoise heads (a list of names: defaults)
          crystals: {loss: {noise: 0.2, mask_ratio: 0.0}, fitting_net: {neuron: [32]}}

A label-free dataset can only be a denoise head: not an energy head, a fine-tuning system, a
test or distillation target, or a clean stage input (cleaning judges labels; such datasets are
left out of its default list). Where they may be used is checked at `load_spec` (references.py:
label_free_problems); the files here, at `check_spec`
(the files: they exist, parse, and hold only elements of the type map), before any training.
"""

from __future__ import annotations

import glob

from lamflow.model.errors import LamflowError

from . import stage_configs
from .base import as_list, is_s3, spec_source
from .schema import PipelineSpec

GLOB_CHARS = set("*?[")


def expand_globs(raw: dict, source: str, problems: list[str]) -> None:
    """For label-free datasets (paths already absolute): glob patterns -> sorted file lists, and
    fmt auto -> the one format the file names give (cif, extxyz, vasp/poscar; folders: auto), so
    a step reading a staged copy (named 0, 1, ...) knows the format without the name."""
    ds = raw.get("datasets")
    if not isinstance(ds, dict):
        return
    for name, d in ds.items():
        if not isinstance(d, dict) or d.get("label_free") is not True:
            continue
        files = []
        for split in ("train", "valid", "test"):
            v = d.get(split)
            if v is None:
                continue
            out = []
            for i, p in enumerate([v] if isinstance(v, str) else v):
                if isinstance(p, str) and GLOB_CHARS & set(p) and not p.startswith("s3://"):
                    hits = sorted(glob.glob(p))
                    if not hits:
                        where = f"datasets.{name}.{split}" + ("" if isinstance(v, str) else f"[{i}]")
                        problems.append(f"{source}: {where}: no file matches {p}")
                    out += hits
                else:
                    out.append(p)
            d[split] = out
            files += [p for p in out if isinstance(p, str) and not p.startswith("s3://")]
        if d.get("fmt", "auto") == "auto":
            _resolve_format(d, files, f"{source}: datasets.{name}", problems)


def _resolve_format(d: dict, files: list[str], where: str, problems: list[str]) -> None:
    from pathlib import Path

    from lamflow.model.errors import DataError

    fmts = {}
    for p in files:
        if not Path(p).exists():
            continue  # check_spec names it
        try:
            from lamflow.model.data.structures import structure_format

            fmts.setdefault("auto" if Path(p).is_dir() else structure_format(Path(p)), p)
        except DataError as e:
            problems.append(f"{where}: {e}")
            return
    if len(fmts) > 1:
        problems.append(f"{where}: files of several formats ({', '.join(f'{f}: {p}' for f, p in fmts.items())}); "
                        "one fmt per dataset: split it into datasets")
    elif fmts:
        d["fmt"] = next(iter(fmts))


def structure_elements(paths: list[str], fmt: str) -> list[str]:
    """Elements of label-free structures, in order of first appearance (converted once, cached)."""
    from lamflow.model.data.structures import structure_paths
    from lamflow.model.data.systems import elements_in

    return list(dict.fromkeys(elements_in(*structure_paths(paths, fmt))))


def _where(name: str, split: str, value, i: int) -> str:
    return f"datasets.{name}.{split}" + (f"[{i}]" if isinstance(value, list) else "")


def label_free_elements(spec: PipelineSpec, name: str, elements: dict[str, list[str]]) -> list[str]:
    """check_spec's first pass for a label-free dataset: each file exists and parses (converted once
    into the cache); its elements are added to `elements` ("dataset.split" -> elements)."""
    from pathlib import Path


    ds, source, out = spec.datasets[name], spec_source(spec), []
    for split in ("train", "valid", "test"):
        value = getattr(ds, split)
        for i, p in enumerate(as_list(value)):
            where = _where(name, split, value, i)
            if is_s3(p):
                out.append(f"{source}: {where}: label-free datasets are read locally; {p} is on S3 (download it)")
                continue
            if not Path(p).exists():
                out.append(f"{source}: {where}: no such file or directory: {p}")
                continue
            try:
                els = structure_elements([p], ds.fmt)
            except LamflowError as e:
                out.append(f"{source}: {where}: {e}")
                continue
            seen = elements.setdefault(f"{name}.{split}", [])
            seen += [e for e in els if e not in seen]
    return out


def label_free_systems(spec: PipelineSpec, name: str, type_map: list[str]) -> list[str]:
    """check_spec's second pass: the structures load without labels on the type map (an element
    outside it names the file), and fit the pretrain descriptor's sel."""
    from lamflow.model.data.structures import source_of, structure_paths
    from lamflow.model.data.systems import load_systems


    ds, source, out = spec.datasets[name], spec_source(spec), []
    for split in ("train", "valid", "test"):
        value = getattr(ds, split)
        for i, p in enumerate(as_list(value)):
            where = _where(name, split, value, i)
            try:
                paths, fmt = structure_paths([p], ds.fmt)
                systems = []
                for q in paths:
                    try:
                        systems += load_systems([q], type_map, fmt, labeled=False, lazy=True)
                    except LamflowError as e:  # name the user's file, not the cache folder
                        raise type(e)(str(e).replace(q, source_of(q))) from None
            except LamflowError as e:
                out.append(f"{source}: {where}: {e}")
                continue
            out += stage_configs.sel_problems(spec, name, where, systems, type_map)
    return out
