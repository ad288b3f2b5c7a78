"""Running a pipeline: locally in dflow's debug mode, or on Argo Workflows through dflow.

Debug mode (`lamflow submit --debug`) runs every step as a local process under
`<workdir>/<run id>/<step key>/` (dflow's layout). lamflow keeps its own records next to them:

    <workdir>/.lamflow/runs/<run id>.json     the resolved spec, inputs and parent run (for retry)
    <workdir>/.lamflow/<group>/data/          the staged datasets (symlinks to your data)
    <workdir>/.lamflow/<group>/resume/<key>/  training checkpoints that survive a failed step

Argo mode uploads the staged datasets to S3 under a key derived from their file sizes and
times, renders the manifest (`render_manifest`, the same bytes `lamflow render` writes) and
POSTs it to argo-server with dflow's API client. Secrets (Argo token, S3 keys) come only from
the environment and are blanked from every template before rendering: pods reach S3 through
the namespace's artifact repository.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamflow.model.errors import LamflowError

from .dag import (HELPER_SUFFIXES, ORDER, BuildOptions, Inputs, build_workflow, display_key, keys_from, stage_of,
                  step_keys)
from .spec import (PipelineSpec, SpecError, as_list, check_spec, image_problems, is_s3, resolved_type_map,
                   spec_from_summary, spec_summary)

META = ".lamflow"
LABEL = "lamflow.io/pipeline"
ANNOTATION = "lamflow.io/spec"
FINAL = ("Succeeded", "Failed", "Error", "Skipped", "Omitted")


class EngineError(LamflowError):
    """The run cannot be submitted or found: `LAMFLOW_ARGO_HOST is not set`, `no run quick-x1y2z`."""


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class ArgoEnv:
    host: str
    token: str | None
    namespace: str
    s3_endpoint: str | None
    s3_access_key: str | None
    s3_secret_key: str | None
    s3_bucket: str | None
    s3_secure: bool = False

    @classmethod
    def from_env(cls, spec: PipelineSpec | None = None, need_s3: bool = True) -> "ArgoEnv":
        e = os.environ
        eng = spec.engine if spec is not None else None
        host = e.get("LAMFLOW_ARGO_HOST") or (eng.host if eng else None)
        if not host:
            raise EngineError("no Argo server: set LAMFLOW_ARGO_HOST (or engine.host in the pipeline), "
                              "or run locally with --debug")
        ns = e.get("LAMFLOW_NAMESPACE") or (eng.namespace if eng else "lamflow")
        env = cls(host=host, token=e.get("LAMFLOW_ARGO_TOKEN") or None, namespace=ns,
                  s3_endpoint=e.get("LAMFLOW_S3_ENDPOINT"), s3_access_key=e.get("LAMFLOW_S3_ACCESS_KEY"),
                  s3_secret_key=e.get("LAMFLOW_S3_SECRET_KEY"), s3_bucket=e.get("LAMFLOW_S3_BUCKET"),
                  s3_secure=e.get("LAMFLOW_S3_SECURE", e.get("DFLOW_S3_SECURE", "false")).lower() in ("1", "true", "yes"))
        if need_s3:
            missing = [k for k, v in (("LAMFLOW_S3_ENDPOINT", env.s3_endpoint), ("LAMFLOW_S3_ACCESS_KEY", env.s3_access_key),
                                      ("LAMFLOW_S3_SECRET_KEY", env.s3_secret_key), ("LAMFLOW_S3_BUCKET", env.s3_bucket))
                       if not v]
            if missing:
                raise EngineError(f"S3 settings missing from the environment: {', '.join(missing)} (see deploy/README.md)")
        return env

    def secrets(self) -> list[str]:
        return [s for s in (self.token, self.s3_access_key, self.s3_secret_key) if s]


def configure_argo(env: ArgoEnv, spec: PipelineSpec | None = None) -> None:
    """Point dflow at the cluster. The token is passed to Workflow objects, never put in config
    (dflow embeds its config in every step script)."""
    from dflow import config, s3_config

    config["mode"] = "default"
    config["host"] = env.host
    config["namespace"] = env.namespace
    config["token"] = None
    if os.environ.get("DFLOW_K8S_API_SERVER"):  # for reuse (memoization ConfigMaps); dflow reads it at import only
        config["k8s_api_server"] = os.environ["DFLOW_K8S_API_SERVER"]
    if spec is not None:
        util = spec.engine.util_image or spec.resources.image
        if util:
            config["util_image"] = util
    if env.s3_endpoint:
        s3_config.update(endpoint=env.s3_endpoint, access_key=env.s3_access_key, secret_key=env.s3_secret_key,
                         bucket_name=env.s3_bucket, secure=env.s3_secure)


@contextmanager
def scrubbed():
    """dflow writes `config` and `s3_config` (S3 keys included) into every step script as the
    template is built. Build templates inside this block: the keys and token are blank there."""
    from dflow import config, s3_config

    saved = (dict(config), dict(s3_config))
    config["token"] = None
    s3_config["access_key"] = ""
    s3_config["secret_key"] = ""
    try:
        yield
    finally:
        config.update(saved[0])
        s3_config.update(saved[1])


# dflow acts on these when it is imported: with DFLOW_S3_REPO_KEY set, `import dflow` reads the
# artifact-repositories ConfigMap from Kubernetes (a traceback when no cluster answers); the lineage
# and storage-client variables import and build cluster clients
CLUSTER_ENV = ("DFLOW_S3_REPO_KEY", "DFLOW_LINEAGE", "DFLOW_S3_STORAGE_CLIENT")


def import_dflow_offline():
    """Import dflow without letting it reach a cluster at import time (render must work offline
    whatever the environment holds). The variables are put back for everything else."""
    import sys

    if "dflow" in sys.modules:
        return sys.modules["dflow"]
    saved = {k: os.environ.pop(k) for k in CLUSTER_ENV if k in os.environ}
    try:
        import dflow
    finally:
        os.environ.update(saved)
    return dflow


@contextmanager
def offline():
    """Build dflow Workflow objects without reaching any cluster, whatever the environment holds:
    DFLOW_S3_REPO_KEY makes dflow read the artifact-repositories ConfigMap from Kubernetes when a
    Workflow is created, DFLOW_REGISTER_TASKS registers it with a lineage server. lamflow sets
    artifactRepositoryRef on the manifest itself (engine.artifact_repo_key)."""
    import_dflow_offline()
    from dflow import config, s3_config

    saved = (config.get("register_tasks"), s3_config.get("repo_key"))
    config["register_tasks"] = False
    s3_config["repo_key"] = None
    try:
        yield
    finally:
        config["register_tasks"], s3_config["repo_key"] = saved


def configure_debug(workdir: Path, pool_workers: int) -> None:
    from dflow import config

    config["mode"] = "debug"
    config["debug_workdir"] = str(workdir)
    config["debug_pool_workers"] = pool_workers
    config["debug_copy_method"] = "symlink"


def workdir_of(spec: PipelineSpec | None = None, override: str | os.PathLike | None = None) -> Path:
    w = override or os.environ.get("LAMFLOW_WORKDIR") or (spec.debug.workdir if spec else "lamflow-runs")
    return Path(w).resolve()


# ----------------------------------------------------------------------------- inputs


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


def localize(spec: PipelineSpec) -> PipelineSpec:
    """Replace s3:// dataset paths by local copies (downloaded once into the cache)."""
    if not any(is_s3(p) for d in spec.datasets.values() for s in ("train", "valid", "test") for p in as_list(getattr(d, s))):
        return spec
    raw = spec.model_dump(mode="json", exclude_unset=True)
    for d in raw["datasets"].values():
        for s in ("train", "valid", "test"):
            v = d.get(s)
            if isinstance(v, str) and is_s3(v):
                d[s] = str(fetch_s3(v))
            elif isinstance(v, list):
                d[s] = [str(fetch_s3(x)) if is_s3(x) else x for x in v]
    return spec_from_summary({"spec": raw, "source": spec_summary(spec)["source"]})


def stage_data(spec: PipelineSpec, root: Path) -> Path:
    """The used datasets in the ops.common layout (symlinks), under root/data."""
    from lamflow.ops.common import stage_dataset

    data = root / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        stage_dataset(data, name, {s: as_list(getattr(ds, s)) for s in ("train", "valid", "test")}, ds.fmt)
    return data


def stage_pretrained(spec: PipelineSpec, root: Path) -> Path | None:
    ckpt = spec.stages.finetune.pretrained
    if spec.stages.pretrain.enabled or not spec.stages.finetune.enabled or not ckpt:
        return None
    src = fetch_s3(ckpt) if is_s3(ckpt) else Path(ckpt)
    d = root / "pretrained"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "model.ckpt"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(src).resolve() if Path(src).is_file() else Path(src).resolve() / "model.ckpt")
    return d


def data_digest(spec: PipelineSpec, extra: list[Path] = ()) -> str:
    """A short digest of the used data (paths, sizes, modification times): the S3 key of the upload."""
    h = hashlib.sha256()
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        h.update(f"{name}|{ds.fmt}".encode())
        for s in ("train", "valid", "test"):
            for i, p in enumerate(as_list(getattr(ds, s))):
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
        for sp in ("train", "valid", "test"):
            for i, p in enumerate(as_list(getattr(ds, sp))):
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


# ----------------------------------------------------------------------------- render / Argo


def render_manifest(spec: PipelineSpec, *, namespace: str | None = None, type_map: list[str] | None = None,
                    keys: dict[str, str] | None = None, workflow=None, reuse_step=None) -> dict:
    """The Argo Workflow manifest of a pipeline, offline: no server, no object store.

    apiVersion/kind/metadata.namespace are added (dflow omits them), the ServiceAccount is the
    spec's, and the resolved spec is stored as an annotation (for `lamflow retry`)."""
    import_dflow_offline()
    from dflow import config

    ns = namespace or os.environ.get("LAMFLOW_NAMESPACE") or spec.engine.namespace
    if workflow is None:
        workflow = argo_workflow(spec, type_map=type_map, keys=keys)
    saved_mode = config["mode"]
    config["mode"] = "default"
    try:
        with offline():
            wf = workflow.convert_to_argo(reuse_step=reuse_step)
    finally:
        config["mode"] = saved_mode
    m = workflow.api_instance.api_client.sanitize_for_serialization(wf)
    m.pop("status", None)
    out = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow"}
    out.update(m)
    out["metadata"]["namespace"] = ns
    out["spec"]["serviceAccountName"] = spec.engine.service_account
    for t in out["spec"]["templates"]:
        if "memoize" in t:
            # Argo v4's CRD requires memoize.maxAge (dflow omits it); "" means the cache entry never expires
            t["memoize"].setdefault("maxAge", "")
    if spec.engine.artifact_repo_key:
        # set here, not through dflow, which would read the artifact-repositories ConfigMap from the cluster
        out["spec"]["artifactRepositoryRef"] = {"key": spec.engine.artifact_repo_key}
    return out


def argo_workflow(spec: PipelineSpec, *, type_map: list[str] | None = None, keys: dict[str, str] | None = None,
                  env: ArgoEnv | None = None, parent: str | None = None, checkpoint_run: str | None = None):
    """The dflow Workflow for Argo, templates built with blank secrets and seeded names.
    `checkpoint_run`: the run whose checkpoint keys training steps resume from (a retry passes
    its first run's id; default: this workflow's own name)."""
    from dflow import config

    if type_map is None:
        type_map = resolved_type_map(spec)
    keys = keys or input_keys(spec)
    saved = config["mode"], config["util_image"]
    config["mode"] = "default"
    util = spec.engine.util_image or spec.resources.image
    if util:
        config["util_image"] = util
    summary = spec_summary(spec)
    meta = {**summary, "type_map": type_map, "keys": keys, "parent": parent}
    if checkpoint_run:
        meta["checkpoint_run"] = checkpoint_run
    annotations = {ANNOTATION: json.dumps(meta)}
    labels = {LABEL: spec.name, "app.kubernetes.io/managed-by": "lamflow"}
    kw = dict(namespace=env.namespace if env else (os.environ.get("LAMFLOW_NAMESPACE") or spec.engine.namespace),
              parallelism=spec.engine.parallelism,
              pod_gc_strategy=spec.engine.pod_gc_strategy)
    if env is not None:
        kw.update(host=env.host, token=env.token)
    try:
        with scrubbed(), offline():
            opts = BuildOptions(mode="argo", type_map=type_map, digests=dataset_digests(spec),
                                inputs_key=keys["data"].rsplit("/", 1)[0],
                                checkpoint_run=checkpoint_run or "{{workflow.name}}")
            return build_workflow(spec, s3_inputs(keys), opts,
                                  labels=labels, annotations=annotations, seed=json.dumps(summary, sort_keys=True), **kw)
    finally:
        config["mode"], config["util_image"] = saved


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

    from lamflow.ops.common import stage_dataset

    base = keys["data"].rsplit("/", 1)[0] + "/systems"
    fanouts = {"finetune": spec.finetune_systems}
    if not spec.finetune_systems:
        fanouts["test"] = spec.test_systems
    for fanout, systems in fanouts.items():
        for i, name in enumerate(systems):
            key = f"{base}/{fanout}/{i}"
            if not force and _s3_exists(key):
                continue
            ds = spec.datasets[name]
            d = root / "systems" / fanout / str(i)
            stage_dataset(d, name, {s: as_list(getattr(ds, s)) for s in ("train", "valid", "test")}, ds.fmt)
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


def post_manifest(manifest: dict, env: ArgoEnv) -> dict:
    """POST /api/v1/workflows/<namespace> through dflow's Argo API client."""
    from dflow import config
    from dflow.workflow import get_argo_api_client

    with get_argo_api_client(env.host, env.token) as api:
        return api.call_api(f"/api/v1/workflows/{env.namespace}", "POST", body={"workflow": manifest},
                            response_type=object, header_params=config["http_headers"], _return_http_data_only=True)


def assert_no_secrets(manifest: dict, env: ArgoEnv) -> None:
    text = json.dumps(manifest)
    for s in env.secrets():
        if s and s in text:
            raise EngineError("refusing to submit: a secret from the environment appears in the manifest")


def submit_argo(spec: PipelineSpec, *, check_data: bool = True) -> str:
    problems = check_spec(spec, data=False) + image_problems(spec)
    if problems:
        raise SpecError(problems)
    env = ArgoEnv.from_env(spec)
    local = localize(spec)  # s3:// datasets fetched into the cache, so they are checked like local ones
    if check_data:
        problems = check_spec(local, data=True)
        if problems:
            raise SpecError(problems)
    configure_argo(env, spec)
    keys = input_keys(spec)
    upload_inputs(local, keys, force=local is not spec or is_s3(spec.stages.finetune.pretrained or ""))
    wf = argo_workflow(spec, keys=keys, env=env)
    manifest = render_manifest(spec, namespace=env.namespace, workflow=wf)
    assert_no_secrets(manifest, env)
    res = post_manifest(manifest, env)
    wid = (res.get("metadata") or {}).get("name") if isinstance(res, dict) else None
    if not wid:
        raise EngineError(f"argo-server accepted the workflow but returned no name: {str(res)[:200]}")
    return wid


# ----------------------------------------------------------------------------- debug runs


def meta_path(workdir: Path, run_id: str) -> Path:
    return workdir / META / "runs" / f"{run_id}.json"


def read_meta(workdir: Path, run_id: str) -> dict | None:
    p = meta_path(workdir, run_id)
    return json.loads(p.read_text()) if p.is_file() else None


def write_meta(workdir: Path, meta: dict) -> None:
    from lamflow.model.io.files import atomic_write_text

    atomic_write_text(meta_path(workdir, meta["id"]), json.dumps(meta, indent=2))


def new_run_id(name: str, workdir: Path) -> str:
    from dflow.utils import randstr

    while True:
        rid = f"{name}-{randstr()}"
        if not (workdir / rid).exists() and not meta_path(workdir, rid).exists():
            return rid


def submit_debug(spec: PipelineSpec, *, workdir: Path | None = None, check_data: bool = True, reuse=None,
                 parent: dict | None = None, restage: bool = False, progress=print, container=None) -> tuple[str, str]:
    """Run the pipeline locally; return (run id, final status). `reuse`: dflow steps of an earlier
    run to reuse (retry; only those whose key, input hash included, is a step of this run);
    `parent`: that run's record, whose staged inputs (unless `restage`: the spec's data changed)
    and checkpoint folders this run shares. `container`: a containers.Container to run every step
    in (a retry uses its parent's).

    Steps' output (and dflow's tracebacks) go to the log files, not the console: each step's to
    <workdir>/<run id>/<step>/log.txt, dflow's to <workdir>/.lamflow/logs/<run id>.log; the console
    gets the phase changes, and a failing step's one-line error (`failures`)."""
    from .containers import for_run, workflow_context

    container = for_run(container, parent)
    if progress is print:  # bound now: while steps run, sys.stdout is the log file
        progress = functools.partial(print, file=sys.stdout, flush=True)
    if parent is None:
        problems = check_spec(spec, data=False)
        if problems:
            raise SpecError(problems)
        spec = localize(spec)  # s3:// datasets fetched into the cache
        problems = check_spec(spec, data=check_data)
        if problems:
            raise SpecError(problems)
    workdir = workdir or workdir_of(spec)
    workdir.mkdir(parents=True, exist_ok=True)
    configure_debug(workdir, spec.debug.pool_workers)
    rid = new_run_id(spec.name, workdir)
    if parent is None or restage:
        group = rid
        type_map = resolved_type_map(spec)
        gdir = workdir / META / group
        stage_data(spec, gdir)
        pre = stage_pretrained(spec, gdir)
        inputs = {"data": str(gdir / "data"), "pretrained": str(pre) if pre else None}
    else:
        group, type_map, inputs = parent["group"], parent["type_map"], parent["inputs"]
    resume_root = (parent or {}).get("resume_root") or str(workdir / META / (parent or {}).get("group", group) / "resume")
    from dflow import upload_artifact

    arts = Inputs(data=upload_artifact(inputs["data"]),
                  pretrained=upload_artifact(inputs["pretrained"]) if inputs.get("pretrained") else None)
    opts = BuildOptions(mode="debug", type_map=type_map, resume_root=resume_root, digests=dataset_digests(spec),
                        threads=spec.debug.threads)
    keys = step_keys(spec, opts)
    if reuse is not None:
        reuse = [st for st in reuse if st.key in keys]  # a changed step's old key is no step of this run
        progress(f"reusing {len(reuse)} succeeded step(s): {', '.join(sorted(display_key(st.key) for st in reuse)) or '-'}")
    meta = {"id": rid, "mode": "debug", "group": group, "parent": parent["id"] if parent else None,
            "created": time.time(), "type_map": type_map, "inputs": inputs, "resume_root": resume_root,
            "digests": opts.digests, "step_keys": keys, **spec_summary(spec),
            **({"container": container.record()} if container else {})}
    write_meta(workdir, meta)
    wf = build_workflow(spec, arts, opts, id=rid, **workflow_context(container, workdir, inputs, opts.resume_root))
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.debug.threads))
    progress(f"run {rid}: {workdir / rid}")
    stop = threading.Event()
    timings: dict[str, dict] = {}
    watcher = threading.Thread(target=_watch_debug, args=(workdir / rid, stop, progress, timings), daemon=True)
    watcher.start()
    t0 = time.time()
    log = debug_log(workdir, rid)
    try:
        with _quiet_dflow(), _output_to(log):
            wf.submit(reuse_step=reuse)
        _wait_for_steps(workdir / rid)  # a step still finishing when dflow returns belongs in the table
    finally:
        stop.set()
        watcher.join()
    status = (workdir / rid / "status").read_text().strip() if (workdir / rid / "status").is_file() else "Failed"
    for key in {display_key(k) for k in keys} - set(timings):  # never started (after a failure upstream)
        timings[key] = {"phase": "Omitted"}
    for st in reuse or []:
        timings.setdefault(display_key(st.key), {})["reused"] = True
    meta["finished"] = time.time()
    meta["status"] = status
    meta["wall_s"] = time.time() - t0
    meta["steps"] = timings
    meta["failures"] = failures(workdir / rid, spec) if status != "Succeeded" else {}
    meta["log"] = str(log)
    write_meta(workdir, meta)
    return rid, status


def debug_log(workdir: Path, rid: str) -> Path:
    return workdir / META / "logs" / f"{rid}.log"


@contextmanager
def _output_to(path: Path):
    """sys.stdout and sys.stderr into `path` (dflow's step processes inherit them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as f:
        sys.stdout = sys.stderr = f
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def _wait_for_steps(wfdir: Path, timeout: float = 600.0, poll: float = 0.2) -> None:
    """Until every started step has a final phase (or its process is gone)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        busy = []
        for key, phase in _debug_phases(wfdir).items():
            if phase in FINAL:
                continue
            pid = wfdir / key / "pid"
            try:
                os.kill(int(pid.read_text()), 0)
                busy.append(key)
            except (OSError, ValueError):
                continue  # no process: nothing to wait for
        if not busy:
            return
        time.sleep(poll)


ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\w*): (.+)$")
STAGED = re.compile(r"\S*?/(data|cleaned)/([A-Za-z0-9][A-Za-z0-9_.-]*)/(train|valid|test)/(\d+)(?![\d])")


def failure_line(log_text: str) -> str:
    """The step's own one-line error: the last exception line of its log (a FatalError's message
    is lamflow's error as the user would see it from the command)."""
    lines = [ln.rstrip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = ERROR_LINE.match(ln)
        if m:
            cls = m.group(1).rsplit(".", 1)[-1]
            return m.group(2) if cls in ("FatalError", "TransientError") else f"{cls}: {m.group(2)}"
    return lines[-1] if lines else "(the step wrote no log)"


def user_paths(text: str, spec: PipelineSpec) -> str:
    """Staged copies of the data (<...>/data/<dataset>/<split>/<i>) named by the user's path."""

    def sub(m):
        kind, name, split, i = m.group(1), m.group(2), m.group(3), int(m.group(4))
        ds = spec.datasets.get(name)
        paths = as_list(getattr(ds, split)) if ds is not None else []
        if i >= len(paths):
            return m.group(0)
        return paths[i] if kind == "data" else f"{paths[i]} (its cleaned copy)"

    return STAGED.sub(sub, text)


def failures(wfdir: Path, spec: PipelineSpec) -> dict[str, dict]:
    """display key -> {"error": one line, "log": path} for each failed step of a debug run."""
    out = {}
    for key, phase in _debug_phases(wfdir).items():
        if phase not in ("Failed", "Error"):
            continue
        f = wfdir / key / "log.txt"
        text = f.read_text(errors="replace") if f.is_file() else ""
        out[display_key(key)] = {"error": user_paths(failure_line(text), spec), "log": str(f)}
    return out


@contextmanager
def _quiet_dflow():
    """dflow prints a line per skipped/finished step; lamflow prints its own progress."""
    import logging

    lg, root = logging.getLogger("dflow"), logging.getLogger()
    old = lg.level, root.level
    lg.setLevel(logging.WARNING)
    root.setLevel(logging.ERROR)  # dflow warns "step (key: ...) skipped" on the root logger for each reused step
    try:
        yield
    finally:
        lg.setLevel(old[0])
        root.setLevel(old[1])


def _watch_debug(wfdir: Path, stop: threading.Event, progress, timings: dict) -> None:
    """Print each step's phase changes; record when each step was first seen running and when it
    ended (seconds since the run started, to the 0.2 s polling interval)."""
    seen: dict[str, str] = {}
    t0 = time.time()
    while True:
        done = stop.wait(0.2)
        now = time.time() - t0
        for full, phase in _debug_phases(wfdir).items():
            key = display_key(full)
            if seen.get(key) != phase:
                seen[key] = phase
                progress(f"  [{now:6.1f}s] {key:<14} {phase}")
                t = timings.setdefault(key, {"start": now})
                if phase in FINAL:
                    t["end"], t["phase"] = now, phase
        if done:
            return


def _debug_phases(wfdir: Path) -> dict[str, str]:
    out = {}
    if not wfdir.is_dir():
        return out
    for d in sorted(wfdir.iterdir()):
        f = d / "phase"
        if d.is_dir() and f.is_file() and stage_of(d.name) in ORDER:
            out[d.name] = f.read_text().strip()
    return out


# ----------------------------------------------------------------------------- finding runs


@dataclass
class Run:
    id: str
    mode: str  # "debug" | "argo"
    workdir: Path | None = None
    meta: dict | None = None
    env: ArgoEnv | None = None

    @property
    def spec(self) -> PipelineSpec:
        return spec_from_summary(self.meta)

    def workflow(self):
        from dflow import Workflow

        if self.mode == "debug":
            configure_debug(self.workdir, 1)
            return Workflow(id=self.id)
        configure_argo(self.env)
        return Workflow(id=self.id, host=self.env.host, token=self.env.token, namespace=self.env.namespace)


def find_run(run_id: str, workdir: str | os.PathLike | None = None) -> Run:
    wd = workdir_of(override=workdir)
    meta = read_meta(wd, run_id)
    if meta is not None:
        return Run(run_id, "debug", wd, meta)
    if not os.environ.get("LAMFLOW_ARGO_HOST"):
        raise EngineError(f"no run {run_id!r} in {wd} (debug runs), and LAMFLOW_ARGO_HOST is not set (Argo runs)")
    env = ArgoEnv.from_env(need_s3=False)
    run = Run(run_id, "argo", env=env)
    wf = run.workflow().query()
    ann = (wf.metadata.get("annotations") or {}) if hasattr(wf, "metadata") else {}
    run.meta = json.loads(ann[ANNOTATION]) if ANNOTATION in ann else None
    return run


@dataclass
class StepInfo:
    key: str  # as users see it, without the input hash: `test-1`
    stage: str
    phase: str
    system: str | None
    summary: dict | None
    step: object  # the dflow ArgoStep (step.key: the full key)


def unwrap(v):
    """Sliced steps return their output parameters wrapped as [{dflow_list_item: v, order: i}]."""
    if hasattr(v, "recover"):  # dflow's ArgoObjectDict / ArgoObjectList
        v = v.recover()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and "dflow_list_item" in v[0]:
        return v[0]["dflow_list_item"]
    return v


def steps_of(run: Run) -> list[StepInfo]:
    """The keyed steps of a run, in pipeline order."""
    wf = run.workflow()
    spec = run.spec if run.meta else None
    out = []
    for s in wf.query_step():
        key = s.get("key")
        if not key or stage_of(key) not in ORDER:
            continue
        summary = None
        outs = s.get("outputs") or {}
        pars = outs.get("parameters") if hasattr(outs, "get") else None
        if pars is not None and "summary" in pars:
            try:
                summary = unwrap(pars["summary"].value)
            except AttributeError:
                summary = None
        short = display_key(key)
        out.append(StepInfo(short, stage_of(key), s.phase, _system_of(short, spec),
                            summary if isinstance(summary, dict) else None, s))
    out.sort(key=lambda i: (ORDER.index(i.stage), int(i.key.rsplit("-", 1)[1]) if i.key[-1].isdigit() else 0))
    return out


def _system_of(key: str, spec: PipelineSpec | None) -> str | None:
    if spec is None or not key[-1].isdigit():
        return None
    i = int(key.rsplit("-", 1)[1])
    systems = spec.finetune_systems or spec.test_systems
    return systems[i] if i < len(systems) else None


def run_status(run: Run) -> str:
    if run.mode == "debug":
        f = run.workdir / run.id / "status"
        return f.read_text().strip() if f.is_file() else "Pending"
    return run.workflow().query_status()


# ----------------------------------------------------------------------------- retry


def retry(run: Run, from_stage: str | None = None, progress=print, spec: PipelineSpec | None = None,
          check_data: bool = True) -> tuple[str | None, str | None]:
    """A new run that reuses every succeeded step whose inputs did not change (dflow reuse_step;
    step keys hold a hash of the step's inputs). `spec`: a fixed pipeline (`--spec`), validated
    like a new submit; by default the run's own. `from_stage`: that stage and every later one
    rerun from scratch (their checkpoint folders are emptied first).
    Debug: runs it now and returns (id, status); Argo: submits it and returns (id, None);
    (None, None) when there is nothing to retry (every step succeeded with these inputs)."""
    if run.meta is None:
        raise EngineError(f"{run.id}: not a lamflow run (no stored spec)")
    if from_stage is not None and from_stage not in ORDER:
        raise EngineError(f"--from {from_stage}: not a stage ({', '.join(ORDER)})")
    if spec is None:
        spec = run.spec
    else:
        problems = check_spec(spec, data=False) + (image_problems(spec) if run.mode == "argo" else [])
        if problems:
            raise SpecError(problems)
        spec = localize(spec)
        problems = check_spec(spec, data=check_data)
        if problems:
            raise SpecError(problems)
    rerun = keys_from(spec, from_stage) if from_stage else set()
    keys = run_keys(run, spec)
    if from_stage is not None and from_stage not in {stage_of(k) for k in keys}:
        raise EngineError(f"--from {from_stage}: the pipeline has no {from_stage} step "
                          f"(stages: {', '.join(spec.stages.enabled())}, report)")
    reuse = [i.step for i in steps_of(run) if i.phase == "Succeeded" and i.stage not in rerun and i.step.key in keys]
    if not rerun and set(keys) <= {st.key for st in reuse}:
        progress(f"{run.id}: nothing to retry: every step succeeded with these inputs "
                 "(change the pipeline and pass --spec, or rerun stages with --from STAGE)")
        return None, None
    if run.mode == "debug":
        root = Path(_resume_root(run))
        for k in keys:
            if stage_of(k) in rerun and (root / k).exists():
                shutil.rmtree(root / k)  # --from: train from scratch, not from the old final checkpoint
        restage = dataset_digests(spec) != run.meta.get("digests", dataset_digests(run.spec))
        return submit_debug(spec, workdir=run.workdir, reuse=reuse, parent={**run.meta, "resume_root": str(root)},
                            restage=restage, progress=progress)
    progress(f"reusing {len(reuse)} succeeded step(s): {', '.join(sorted(display_key(st.key) for st in reuse)) or '-'}")
    env = run.env
    configure_argo(ArgoEnv.from_env(spec))
    keys3 = run.meta["keys"] if spec is run.spec or dataset_digests(spec) == dataset_digests(run.spec) else input_keys(spec)
    if keys3 is not run.meta["keys"]:
        upload_inputs(spec, keys3)
    # training steps resume from the first run's checkpoints (keyed by their hashed step keys)
    wf = argo_workflow(spec, type_map=run.meta["type_map"] if keys3 is run.meta["keys"] else None, keys=keys3, env=env,
                       parent=run.id, checkpoint_run=run.meta.get("checkpoint_run") or run.id)
    _configmaps_through_core_api(wf)
    manifest = render_manifest(spec, namespace=env.namespace, workflow=wf, reuse_step=reuse)
    assert_no_secrets(manifest, ArgoEnv.from_env(spec))
    res = post_manifest(manifest, env)
    return res["metadata"]["name"], None


def _resume_root(run: Run) -> str:
    return run.meta.get("resume_root") or str(run.workdir / META / run.meta["group"] / "resume")


def run_keys(run: Run, spec: PipelineSpec) -> list[str]:
    """The step keys `spec` gives in this run's setting (its type map and resume folders)."""
    type_map = run.meta.get("type_map") or resolved_type_map(spec)
    if dataset_digests(spec) != run.meta.get("digests", dataset_digests(run.spec)):
        type_map = resolved_type_map(spec)
    opts = BuildOptions(mode=run.mode, type_map=type_map, resume_root=_resume_root(run) if run.mode == "debug" else None,
                        digests=dataset_digests(spec))
    return step_keys(spec, opts)


class _ConfigMapPoster:
    """dflow 1.8.134 creates its memoization ConfigMaps with the kubernetes client's low-level
    `api_client.call_api(path, "POST", body=..., response_type=...)`, a signature that
    kubernetes>=36 no longer has (TypeError). This adapter takes that call and makes it with the
    stable high-level CoreV1Api.create_namespaced_config_map instead."""

    def __init__(self, core):
        self.core = core
        self.api_client = self

    def call_api(self, path: str, method: str, body=None, **_):
        parts = path.strip("/").split("/")  # api/v1/namespaces/<ns>/configmaps
        if method != "POST" or parts[-1] != "configmaps":
            raise EngineError(f"unexpected Kubernetes API call from dflow: {method} {path}")
        return self.core.create_namespaced_config_map(parts[3], body)


def _configmaps_through_core_api(wf) -> None:
    real = wf.get_k8s_core_v1_api
    wf.get_k8s_core_v1_api = lambda: _ConfigMapPoster(real())


# ----------------------------------------------------------------------------- outputs


OUTPUT_OF = {"clean": "cleaned", "pretrain": "model", "finetune": "model", "test": "report", "distill": "model",
             "compress": "model", "report": "report"}


def download(run: Run, out_dir: Path, stage: str | None = None) -> list[Path]:
    """Fetch the report (default) or one stage's output artifacts into out_dir."""
    from dflow import download_artifact

    stage = stage or "report"
    if stage not in OUTPUT_OF:
        raise EngineError(f"--stage {stage}: not a stage ({', '.join(OUTPUT_OF)})")
    steps = [i for i in steps_of(run) if i.stage == stage and i.phase == "Succeeded"
             and not i.key.endswith(HELPER_SUFFIXES)]  # a multi-node stage's inputs/TrainJob steps have no outputs
    if not steps:
        raise EngineError(f"{run.id}: stage {stage} has no succeeded step (yet)")
    out_dir.mkdir(parents=True, exist_ok=True)
    got = []
    for i in steps:
        art = i.step.outputs.artifacts[OUTPUT_OF[stage]]
        if run.mode == "debug":
            got += _copy_debug_artifact(Path(art.local_path), out_dir)
        else:
            download_artifact(art, path=str(out_dir))
            got += [out_dir / p.name for p in out_dir.iterdir() if p.name != ".dflow"]
    if stage == "report":  # the report's files go straight into out_dir
        inner = out_dir / "report"
        if inner.is_dir():
            for f in inner.iterdir():
                dst = out_dir / f.name
                if dst.is_dir():
                    shutil.rmtree(dst)
                shutil.move(str(f), dst)
            inner.rmdir()
        got = sorted(p for p in out_dir.iterdir() if p.name != ".dflow")
    return sorted(set(got))


def _copy_debug_artifact(src: Path, out_dir: Path) -> list[Path]:
    got = []
    for item in sorted(src.iterdir()):
        if item.name == ".dflow":
            continue
        dst = out_dir / item.name
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        if item.is_dir():
            shutil.copytree(item, dst, symlinks=False)
        else:
            shutil.copy2(item, dst)
        got.append(dst)
    return got


def logs(run: Run, stage: str) -> list[tuple[str, str]]:
    """(step key, log text) for each step of a stage (or one step key)."""
    steps = [i for i in steps_of(run) if i.stage == stage or i.key == stage]
    if not steps:
        raise EngineError(f"{run.id}: no step of stage {stage!r}")
    out = []
    for i in steps:
        if run.mode == "debug":
            f = run.workdir / run.id / i.step.key / "log.txt"
            out.append((i.key, f.read_text() if f.is_file() else "(no log yet)"))
        else:
            out.append((i.key, _argo_log(run, i.step)))
    return out


def _argo_log(run: Run, step) -> str:
    from dflow import config
    from dflow.argo_objects import get_pod_name
    from dflow.workflow import get_argo_api_client

    pod = get_pod_name(run.id, step.name, step.templateName, step.id)
    with get_argo_api_client(run.env.host, run.env.token) as api:
        res = api.call_api(f"/api/v1/workflows/{run.env.namespace}/{run.id}/log", "GET",
                           query_params=[("podName", pod), ("logOptions.container", "main")],
                           response_type=object, header_params=config["http_headers"], _return_http_data_only=True,
                           _preload_content=False)
    lines = []
    for raw in res.data.decode().splitlines():
        try:
            lines.append(json.loads(raw)["result"]["content"])
        except (ValueError, KeyError):
            lines.append(raw)
    return "\n".join(lines)


def list_runs(workdir: str | os.PathLike | None = None) -> list[dict]:
    """Debug runs in the workdir, and Argo runs when LAMFLOW_ARGO_HOST is set."""
    wd = workdir_of(override=workdir)
    rows = []
    runs_dir = wd / META / "runs"
    if runs_dir.is_dir():
        for f in sorted(runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            m = json.loads(f.read_text())
            st = wd / m["id"] / "status"
            rows.append({"id": m["id"], "mode": "debug", "status": st.read_text().strip() if st.is_file() else "Pending",
                         "created": m.get("created"), "parent": m.get("parent")})
    if os.environ.get("LAMFLOW_ARGO_HOST"):
        from dflow.workflow import query_workflows

        configure_argo(ArgoEnv.from_env(need_s3=False))
        for w in query_workflows(labels={"app.kubernetes.io/managed-by": "lamflow"}):
            rows.append({"id": w.metadata.name, "mode": "argo", "status": (w.get("status") or {}).get("phase"),
                         "created": w.metadata.get("creationTimestamp"), "parent": None})
    return rows
