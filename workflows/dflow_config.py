"""Pointing dflow at an engine: the Argo settings from the environment, dflow's global config for
Argo or for its local debug mode, and building Workflow objects offline with secrets blanked.

Secrets (Argo token, S3 keys) come only from the environment and never enter a template: dflow
embeds its config in every step script, so templates are built inside `scrubbed()`; `offline()`
keeps dflow from reaching a cluster while a Workflow object is built.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamflow.model.errors import LamflowError

from .spec import PipelineSpec


class EngineError(LamflowError):
    """The run cannot be submitted or found: `LAMFLOW_ARGO_HOST is not set`, `no run quick-x1y2z`."""


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


def configure_debug(workdir: Path, pool_workers: int) -> None:
    """dflow's debug mode: every step a local process under `workdir/<run id>/<step key>/`."""
    from dflow import config

    config["mode"] = "debug"
    config["debug_workdir"] = str(workdir)
    config["debug_pool_workers"] = pool_workers
    config["debug_copy_method"] = "symlink"


def workdir_of(spec: PipelineSpec | None = None, override: str | os.PathLike | None = None) -> Path:
    """Where debug runs live: --workdir, else LAMFLOW_WORKDIR, else the spec's debug.workdir."""
    w = override or os.environ.get("LAMFLOW_WORKDIR") or (spec.debug.workdir if spec else "lamflow-runs")
    return Path(w).resolve()


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
