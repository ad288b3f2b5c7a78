"""Training checkpoints that outlive the pod: the latest checkpoint of a training step, synced to
the artifact store (S3) every `save_freq` steps, and found again when the step starts over in a
fresh pod (Argo's retry of a preempted pod, or `lamflow retry`).

Layout under the step's key (`<prefix>/<run>/<step key>`, e.g. lamflow/checkpoints/prod-x1y2z/pretrain):

    <key>/step-000000010000/model.ckpt      one generation: model + optimizer + sampler state + lcurve history
    <key>/step-000000010000/lcurve.csv
    <key>/manifest.json                     {"step": 10000, "files": {name: {key, size, sha256}}}
    <key>/manifest.prev.json                the generation before (kept until the next one is complete)

A save uploads every file to a temporary key, copies it to its generation's key on the server
and deletes the temporary one; only then is the manifest replaced (a PUT is atomic in S3). So a
reader sees either the old manifest or the new one, and each manifest names complete objects
whose size and sha256 it checks on download: a partial or corrupted generation is never used
(restore falls back to manifest.prev.json, then to a fresh start).

Uploads run in the background (`hook()`, `AsyncSync`): at each save the training thread only
snapshots model.ckpt and lcurve.csv (hard links: the trainer replaces those files atomically, so
a link keeps the saved bytes) and goes on training; one thread uploads the snapshot. The next
save first waits for the previous upload (one at a time, generations in order) and re-raises its
error. A kill mid-upload leaves the old manifest in place (above). The thread is not a daemon, so
a step's process does not exit before its last upload; `wait()` joins it explicitly.

Credentials come from the environment (LAMFLOW_S3_ACCESS_KEY / LAMFLOW_S3_SECRET_KEY, the
names the CLI uses; in a pod they are set from the artifact repository's Secret); endpoint,
bucket and key are plain step parameters. This module imports neither torch nor dflow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

FILES = ("model.ckpt", "lcurve.csv")  # the lcurve history also lives inside model.ckpt (train_state)
MANIFEST, PREVIOUS = "manifest.json", "manifest.prev.json"
FORMAT = "lamflow-checkpoint-sync"


class StoreError(Exception):
    """The store is misconfigured (missing credentials): a retry would not help."""


@dataclass(frozen=True)
class StoreConfig:
    endpoint: str  # host:port as reachable from the pod
    bucket: str
    key: str  # this step's prefix: <prefix>/<run>/<step key>
    secure: bool = False

    @classmethod
    def from_param(cls, d: dict | None) -> "StoreConfig | None":
        """The OP parameter ({} or None: no store, e.g. debug mode)."""
        if not d:
            return None
        return cls(endpoint=d["endpoint"], bucket=d["bucket"], key=str(d["key"]).strip("/"), secure=bool(d.get("secure")))

    def to_param(self) -> dict:
        return {"endpoint": self.endpoint, "bucket": self.bucket, "key": self.key, "secure": self.secure}

    def child(self, name: str) -> "StoreConfig":
        return StoreConfig(self.endpoint, self.bucket, f"{self.key}/{name}", self.secure)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    """Sync (`save`) and find again (`restore`) one step's latest checkpoint."""

    def __init__(self, cfg: StoreConfig, client=None, log=print):
        self.cfg, self.log = cfg, log
        self.client = client or self._client(cfg)

    @staticmethod
    def _client(cfg: StoreConfig):
        from minio import Minio

        ak, sk = os.environ.get("LAMFLOW_S3_ACCESS_KEY"), os.environ.get("LAMFLOW_S3_SECRET_KEY")
        if not ak or not sk:
            raise StoreError(f"checkpoint store s3://{cfg.bucket}/{cfg.key}: LAMFLOW_S3_ACCESS_KEY / LAMFLOW_S3_SECRET_KEY "
                             "are not set in the step's environment")
        return Minio(cfg.endpoint, access_key=ak, secret_key=sk, secure=cfg.secure)

    def _k(self, name: str) -> str:
        return f"{self.cfg.key}/{name}"

    # -- writing
    def _put_atomic(self, final: str, path: Path | None = None, data: bytes | None = None) -> None:
        """Upload to a temporary key, copy to `final` on the server, delete the temporary key."""
        from minio.commonconfig import CopySource

        tmp = self._k(f"tmp/{uuid.uuid4().hex}")
        if path is not None:
            self.client.fput_object(self.cfg.bucket, tmp, str(path))
        else:
            self.client.put_object(self.cfg.bucket, tmp, io.BytesIO(data), len(data), content_type="application/json")
        self.client.copy_object(self.cfg.bucket, final, CopySource(self.cfg.bucket, tmp))
        self.client.remove_object(self.cfg.bucket, tmp)

    def save(self, work: Path, step: int) -> dict:
        """Sync work/model.ckpt (and lcurve.csv) as generation `step`; returns the new manifest."""
        work = Path(work)
        gen = f"step-{int(step):012d}"
        files = {}
        for name in FILES:
            f = work / name
            if not f.is_file():
                continue
            key = self._k(f"{gen}/{name}")
            files[name] = {"key": key, "size": f.stat().st_size, "sha256": sha256_of(f)}
            self._put_atomic(key, path=f)
        if "model.ckpt" not in files:
            raise FileNotFoundError(f"{work / 'model.ckpt'}: no checkpoint to sync")
        manifest = {"format": FORMAT, "version": 1, "step": int(step), "files": files}
        old = self._read_manifest(MANIFEST)
        if old is not None and old.get("step") != int(step):
            self._put_atomic(self._k(PREVIOUS), data=json.dumps(old).encode())
        self._put_atomic(self._k(MANIFEST), data=json.dumps(manifest).encode())
        self._prune({gen, *(self._gen_of(old) or ())})
        return manifest

    @staticmethod
    def _gen_of(m: dict | None) -> set[str]:
        if not m:
            return set()
        return {v["key"].rsplit("/", 2)[-2] for v in m.get("files", {}).values()}

    def _prune(self, keep: set[str]) -> None:
        """Delete generations no manifest names, and temporary objects left by a killed upload
        (a step has one writer, rank 0, whose own temporary objects are gone by now)."""
        prefix = self._k("")
        for obj in self.client.list_objects(self.cfg.bucket, prefix=prefix, recursive=True):
            rel = obj.object_name[len(prefix):]
            top = rel.split("/", 1)[0]
            if (top.startswith("step-") and top not in keep) or top == "tmp":
                self.client.remove_object(self.cfg.bucket, obj.object_name)

    # -- reading
    def _read_manifest(self, name: str) -> dict | None:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.cfg.bucket, self._k(name))
            try:
                m = json.loads(resp.read())
            finally:
                resp.close()
                resp.release_conn()
        except S3Error:
            return None
        except ValueError:
            self.log(f"checkpoint store: {self._k(name)} is not valid JSON; ignored")
            return None
        if not isinstance(m, dict) or m.get("format") != FORMAT or "model.ckpt" not in m.get("files", {}):
            return None
        return m

    def latest(self) -> dict | None:
        return self._read_manifest(MANIFEST)

    def restore(self, work: Path) -> int | None:
        """Download the newest complete, verified generation into work/; return its step (None:
        nothing usable stored, start fresh). A local model.ckpt is kept: it is at least as new as
        anything this step synced (the sync follows the local save)."""
        from minio.error import S3Error

        work = Path(work)
        if (work / "model.ckpt").is_file():
            return None
        work.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, PREVIOUS):
            m = self._read_manifest(name)
            if m is None:
                continue
            staged = {}
            ok = True
            for fname, meta in m["files"].items():
                if fname not in FILES:
                    continue
                tmp = work / f".{fname}.restore"
                try:
                    self.client.fget_object(self.cfg.bucket, meta["key"], str(tmp))
                except S3Error as e:
                    self.log(f"checkpoint store: {meta['key']}: {e.code}; generation {m['step']} not used")
                    ok = False
                    break
                if tmp.stat().st_size != meta["size"] or sha256_of(tmp) != meta["sha256"]:
                    self.log(f"checkpoint store: {meta['key']}: size/sha256 differ from {name}; generation {m['step']} not used")
                    ok = False
                    break
                staged[fname] = tmp
            if not ok:
                for t in work.glob(".*.restore"):
                    t.unlink()
                continue
            for fname, tmp in staged.items():
                os.replace(tmp, work / fname)
            self.log(f"checkpoint store: restored step {m['step']} from s3://{self.cfg.bucket}/{self.cfg.key}")
            return int(m["step"])
        return None

    def fetch_model(self, dest: Path) -> Path:
        """The latest verified model.ckpt into dest/ (the collect step after a TrainJob)."""
        step = self.restore(Path(dest))
        if step is None and not (Path(dest) / "model.ckpt").is_file():
            raise FileNotFoundError(f"s3://{self.cfg.bucket}/{self.cfg.key}: no verified checkpoint stored")
        return Path(dest) / "model.ckpt"

    def hook(self, background: bool = True):
        """An `on_checkpoint(path, step)` for lamflow.model.training.trainer: sync after each save, in a
        background thread (`AsyncSync`) or, with background=False, before training goes on."""
        if background:
            return AsyncSync(self)

        def on_checkpoint(path: Path, step: int) -> None:
            self.save(Path(path).parent, step)
        return on_checkpoint

    # -- plain files (inputs a TrainJob's nodes download)
    def put_tree(self, name: str, root: Path) -> dict:
        """Upload a folder (symlinks followed) as a tar.gz under <key>/<name>.tgz, atomically."""
        import tarfile
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tgz = Path(tmp) / "x.tgz"
            with tarfile.open(tgz, "w:gz", dereference=True) as tar:
                tar.add(str(root), arcname=".")
            key = self._k(f"{name}.tgz")
            self._put_atomic(key, path=tgz)
            return {"key": key, "size": tgz.stat().st_size, "sha256": sha256_of(tgz)}

    def get_tree(self, name: str, dest: Path) -> Path:
        import tarfile

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        tgz = dest.parent / f".{name}.tgz"
        self.client.fget_object(self.cfg.bucket, self._k(f"{name}.tgz"), str(tgz))
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(dest, filter="data")
        tgz.unlink()
        return dest


class AsyncSync:
    """on_checkpoint hook whose uploads run in one background thread (module docstring)."""

    SNAPSHOT = ".ckpt-sync"  # work/.ckpt-sync/: the files of the generation being uploaded

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __call__(self, path: Path, step: int) -> None:
        self.wait()  # the previous upload first: one at a time, and its failure fails the step here
        snap = self.snapshot(Path(path).parent)
        self.thread = threading.Thread(target=self._upload, args=(snap, int(step)), name=f"ckpt-sync-{step}", daemon=False)
        self.thread.start()

    def snapshot(self, work: Path) -> Path:
        snap = work / self.SNAPSHOT
        shutil.rmtree(snap, ignore_errors=True)  # left by a killed process
        snap.mkdir(parents=True)
        for name in FILES:
            f = work / name
            if not f.is_file():
                continue
            try:
                os.link(f, snap / name)  # O(1); the trainer's next save replaces f, not this inode
            except OSError:
                shutil.copy2(f, snap / name)
        return snap

    def _upload(self, snap: Path, step: int) -> None:
        try:
            self.store.save(snap, step)
        except BaseException as e:  # handed to the training thread at the next save or wait()
            self.error = e
            self.store.log(f"checkpoint store: sync of step {step} to s3://{self.store.cfg.bucket}/{self.store.cfg.key} "
                           f"failed: {e}")
        finally:
            shutil.rmtree(snap, ignore_errors=True)

    def wait(self) -> None:
        """Block until the running upload (if any) is done; raise its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err
