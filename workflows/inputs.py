"""A run's inputs: the datasets (and a given pretrained checkpoint) the spec names, staged in the
ops.common layout, digested, and, for Argo, uploaded to S3 once.

    localize(spec)            s3:// dataset paths -> local copies in the cache (s3_cache.py)
    stage_data / stage_pretrained   the used datasets / the checkpoint as one artifact folder
    dataset_digests(spec)     per dataset: a digest of paths, sizes and times (part of step keys)
    input_keys(spec)          the S3 keys of the uploaded inputs (render and submit agree)
    upload_inputs(spec, keys) the staged inputs to those keys, plus one artifact per fan-out system
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from lamflow.ops.artifacts import model_file
from lamflow.ops.common import stage_dataset

from .dag import Inputs
from .s3_cache import fetch_s3
from .spec import PipelineSpec, as_list, is_s3, spec_from_summary, spec_summary

SPLITS = ("train", "valid", "test")


def localize(spec: PipelineSpec) -> PipelineSpec:
    """Replace s3:// dataset paths by local copies (downloaded once into the cache)."""
    if not any(is_s3(p) for d in spec.datasets.values() for s in SPLITS for p in as_list(getattr(d, s))):
        return spec
    raw = spec.model_dump(mode="json", exclude_unset=True)
    for d in raw["datasets"].values():
        for s in SPLITS:
            v = d.get(s)
            if isinstance(v, str) and is_s3(v):
                d[s] = str(fetch_s3(v))
            elif isinstance(v, list):
                d[s] = [str(fetch_s3(x)) if is_s3(x) else x for x in v]
    return spec_from_summary({"spec": raw, "source": spec_summary(spec)["source"]})


def _splits(spec: PipelineSpec, name: str) -> dict[str, list[str]]:
    ds = spec.datasets[name]
    return {s: as_list(getattr(ds, s)) for s in SPLITS}


def stage_data(spec: PipelineSpec, root: Path) -> Path:
    """The used datasets in the ops.common layout (symlinks), under root/data."""
    data = root / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    for name in spec.used_datasets():
        stage_dataset(data, name, _splits(spec, name), spec.datasets[name].fmt)
    return data


def stage_pretrained(spec: PipelineSpec, root: Path) -> Path | None:
    """The given pretrained checkpoint (when finetune starts from one) as root/pretrained/model.ckpt."""
    ckpt = spec.stages.finetune.pretrained
    if spec.stages.pretrain.enabled or not spec.stages.finetune.enabled or not ckpt:
        return None
    src = fetch_s3(ckpt) if is_s3(ckpt) else Path(ckpt)
    d = root / "pretrained"
    d.mkdir(parents=True, exist_ok=True)
    link = model_file(d)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_file(Path(src).resolve()))
    return d


def data_digest(spec: PipelineSpec, extra: list[Path] = ()) -> str:
    """A short digest of the used data (paths, sizes, modification times): the S3 key of the upload."""
    h = hashlib.sha256()
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        h.update(f"{name}|{ds.fmt}".encode())
        for s, paths in _splits(spec, name).items():
            for i, p in enumerate(paths):
                h.update(f"|{s}{i}".encode())
                _hash_tree(h, Path(p))
    for p in extra:
        _hash_tree(h, Path(p))
    return h.hexdigest()[:16]


def dataset_digests(spec: PipelineSpec) -> dict[str, str]:
    """Per used dataset (and a given pretrained checkpoint): a digest of its paths, file sizes and
    modification times. Step keys include them, so changed data reruns the steps that read it."""
    out = {}
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        h = hashlib.sha256(f"{name}|{ds.fmt}".encode())
        for sp, paths in _splits(spec, name).items():
            for i, p in enumerate(paths):
                h.update(f"|{sp}{i}:{p}".encode())
                if not is_s3(p):
                    _hash_tree(h, Path(p))
        out[name] = h.hexdigest()[:16]
    pre = spec.stages.finetune.pretrained
    if pre and not spec.stages.pretrain.enabled:
        h = hashlib.sha256(pre.encode())
        if not is_s3(pre):
            _hash_tree(h, Path(pre))
        out["pretrained"] = h.hexdigest()[:16]
    return out


def _hash_tree(h, p: Path) -> None:
    if not p.exists():
        h.update(b"missing")
        return
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())


def input_keys(spec: PipelineSpec) -> dict[str, str]:
    """S3 keys of the workflow's inputs (deterministic: render and submit agree)."""
    digest = data_digest(spec, [Path(spec.stages.finetune.pretrained)] if spec.stages.finetune.pretrained
                         and not spec.stages.pretrain.enabled and not is_s3(spec.stages.finetune.pretrained) else [])
    keys = {"data": f"lamflow/inputs/{spec.name}-{digest}/data.tgz"}
    if not spec.stages.pretrain.enabled and spec.stages.finetune.enabled and spec.stages.finetune.pretrained:
        keys["pretrained"] = f"lamflow/inputs/{spec.name}-{digest}/pretrained.tgz"
    return keys


def s3_inputs(keys: dict[str, str]) -> Inputs:
    from dflow import S3Artifact

    return Inputs(data=S3Artifact(key=keys["data"]),
                  pretrained=S3Artifact(key=keys["pretrained"]) if "pretrained" in keys else None)


def upload_inputs(spec: PipelineSpec, keys: dict[str, str], force: bool = False) -> None:
    """Upload the staged data (and a given pretrained checkpoint) to their S3 keys, once (always
    with force: the key of data fetched from S3 is derived from its URIs, not its content)."""
    from dflow import upload_artifact

    with tempfile.TemporaryDirectory(prefix="lamflow-stage-") as tmp:
        root = Path(tmp)
        data = stage_data(spec, root)
        todo = {"data": data}
        pre = stage_pretrained(spec, root)
        if pre is not None:
            todo["pretrained"] = pre
        for what, path in todo.items():
            if not force and _s3_exists(keys[what]):
                print(f"{what}: already uploaded (s3 key {keys[what]})")
                continue
            print(f"{what}: uploading to s3 key {keys[what]}")
            upload_artifact(str(path), key=keys[what])
        upload_system_data(spec, keys, root, force)


def upload_system_data(spec: PipelineSpec, keys: dict[str, str], root: Path, force: bool = False) -> None:
    """One artifact per fan-out item (fine-tune / test system i) under <inputs>/systems/<fanout>/<i>,
    holding only that dataset: each fan-out pod downloads its own system (dag.system_data)."""
    from dflow import upload_artifact

    base = keys["data"].rsplit("/", 1)[0] + "/systems"
    fanouts = {"finetune": spec.finetune_systems}
    if not spec.finetune_systems:
        fanouts["test"] = spec.test_systems
    for fanout, systems in fanouts.items():
        for i, name in enumerate(systems):
            key = f"{base}/{fanout}/{i}"
            if not force and _s3_exists(key):
                continue
            d = root / "systems" / fanout / str(i)
            stage_dataset(d, name, _splits(spec, name), spec.datasets[name].fmt)
            upload_artifact(str(d), key=key)


def _s3_exists(key: str) -> bool:
    from dflow import s3_config
    from minio import Minio
    from minio.error import S3Error

    c = Minio(s3_config["endpoint"], access_key=s3_config["access_key"], secret_key=s3_config["secret_key"],
              secure=s3_config["secure"])
    try:
        c.stat_object(s3_config["bucket_name"], s3_config["prefix"] + key)
        return True
    except S3Error:
        return False
