"""The elements of a pipeline's data: the type map (`type_map:` or every element of the used
datasets, in order of appearance), read from deepmd's type_map.raw/type.raw where it can be (no
torch import), else through lamflow.model.data."""

from __future__ import annotations

from pathlib import Path

from .base import as_list, is_s3
from .label_free import structure_elements
from .schema import PipelineSpec


def native_elements(path: str, fmt: str = "auto") -> list[str] | None:
    """Elements of deepmd/npy or deepmd/raw systems at or below `path`, from type_map.raw and
    type.raw alone (no torch import: `lamflow render` stays quick). None: another format, or no
    type_map.raw, so lamflow.model.data.systems.elements_in must read it."""
    if fmt not in ("auto", "deepmd/npy", "deepmd/raw"):
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    dirs = [p] if (p / "type.raw").is_file() else sorted({f.parent for f in p.rglob("type.raw")})
    if not dirs:
        return None
    seen: list[str] = []
    for d in dirs:
        if not (d / "type_map.raw").is_file():
            return None
        names = (d / "type_map.raw").read_text().split()
        try:
            types = sorted({int(t) for t in (d / "type.raw").read_text().split()})
        except ValueError:
            return None
        if any(t >= len(names) or t < 0 for t in types):
            return None
        seen += [names[t] for t in types if names[t] not in seen]
    return seen


def resolved_type_map(spec: PipelineSpec, elements: dict[str, list[str]] | None = None) -> list[str]:
    """`type_map:` if given; else every element of the used datasets in order of appearance."""
    if spec.type_map:
        return list(spec.type_map)

    def elements_in(paths, fmt):
        out: list[str] = []
        for p in paths:
            els = native_elements(p, fmt)
            if els is None:
                from lamflow.model.data.systems import elements_in as read

                els = read([p], fmt)
            out += [e for e in els if e not in out]
        return out

    seen: list[str] = []
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        for split in ("train", "valid", "test"):
            paths = [p for p in as_list(getattr(ds, split)) if not is_s3(p)]
            if not paths:
                continue
            els = elements.get(f"{name}.{split}") if elements else None
            if els is None and ds.label_free:
                els = structure_elements(paths, ds.fmt)
            elif els is None:
                els = elements_in(paths, ds.fmt)
            seen += [e for e in els if e not in seen]
    return seen


def spec_elements(spec: PipelineSpec) -> dict[str, list[str]]:
    """"dataset.split" -> elements of the local paths of every used dataset."""
    from lamflow.model.data.systems import elements_in

    out: dict[str, list[str]] = {}
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        for split in ("train", "valid", "test"):
            paths = [p for p in as_list(getattr(ds, split)) if not is_s3(p)]
            if paths and ds.label_free:
                out[f"{name}.{split}"] = structure_elements(paths, ds.fmt)
            elif paths:
                out[f"{name}.{split}"] = list(dict.fromkeys(elements_in(paths, ds.fmt)))
    return out
