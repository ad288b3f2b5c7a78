"""The local cache of s3:// datasets and checkpoints a pipeline names: each object is downloaded
once into `$LAMFLOW_CACHE/s3/<bucket>/<key>` (default ~/.cache/lamflow) and fetched again only
when its size or time on the store changed."""

from __future__ import annotations

import os
from pathlib import Path

from .dflow_config import EngineError


def s3_cache_dir() -> Path:
    return Path(os.environ.get("LAMFLOW_CACHE", Path.home() / ".cache" / "lamflow")) / "s3"


def fetch_s3(uri: str) -> Path:
    """Download an s3://bucket/prefix (object or prefix) into the local cache, using the
    LAMFLOW_S3_* credentials; return the local path."""
    from minio import Minio

    bucket, _, key = uri[len("s3://"):].partition("/")
    e = os.environ
    if not e.get("LAMFLOW_S3_ENDPOINT"):
        raise EngineError(f"{uri}: set LAMFLOW_S3_ENDPOINT, LAMFLOW_S3_ACCESS_KEY, LAMFLOW_S3_SECRET_KEY to read S3 data")
    client = Minio(e["LAMFLOW_S3_ENDPOINT"], access_key=e.get("LAMFLOW_S3_ACCESS_KEY"), secret_key=e.get("LAMFLOW_S3_SECRET_KEY"),
                   secure=e.get("LAMFLOW_S3_SECURE", "false").lower() in ("1", "true", "yes"))
    dest = s3_cache_dir() / bucket / key.rstrip("/")
    objs = list(client.list_objects(bucket, prefix=key, recursive=True))
    if not objs:
        raise EngineError(f"{uri}: no such object or prefix")
    for o in objs:
        rel = o.object_name[len(key):].lstrip("/")
        target = dest / rel if rel else dest
        stamp = o.last_modified.timestamp() if o.last_modified else None
        fresh = target.is_file() and target.stat().st_size == o.size and stamp is not None and target.stat().st_mtime == stamp
        if not fresh:
            client.fget_object(bucket, o.object_name, str(target))
            if stamp is not None:
                os.utime(target, (stamp, stamp))  # the cached copy carries the object's time: a changed object is fetched again
    return dest
