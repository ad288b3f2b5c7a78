"""The Argo backend: the pipeline runs on Argo Workflows, through dflow (`lamflow submit`).

Submitting uploads the staged datasets to S3 under a key derived from their file sizes and
times (inputs.py), renders the manifest (render.py: the same bytes `lamflow render` writes) and
POSTs it to argo-server with dflow's API client. Secrets (Argo token, S3 keys) come only from the
environment and are blanked from every template before rendering: pods reach S3 through the
namespace's artifact repository. A run's record is the Workflow's `lamflow.io/spec` annotation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..dag import display_key
from ..dflow_config import ArgoEnv, EngineError, configure_argo
from ..inputs import dataset_digests, input_keys, localize, upload_inputs
from ..render import ANNOTATION, argo_workflow, render_manifest
from ..runs import Run
from ..spec import PipelineSpec, SpecError, check_spec, image_problems, is_s3
from .base import Backend


class ArgoBackend(Backend):
    name = "argo"

    def submit(self, spec: PipelineSpec, *, check_data: bool = True, **_) -> tuple[str, None]:
        return submit_argo(spec, check_data=check_data), None

    def find(self, run_id: str, workdir: Path) -> Run | None:
        if not os.environ.get("LAMFLOW_ARGO_HOST"):
            return None
        run = Run(run_id, self, env=ArgoEnv.from_env(need_s3=False))
        wf = run.workflow().query()
        ann = (wf.metadata.get("annotations") or {}) if hasattr(wf, "metadata") else {}
        run.meta = json.loads(ann[ANNOTATION]) if ANNOTATION in ann else None
        return run

    def runs(self, workdir: Path) -> list[dict]:
        if not os.environ.get("LAMFLOW_ARGO_HOST"):
            return []
        from dflow.workflow import query_workflows

        configure_argo(ArgoEnv.from_env(need_s3=False))
        return [{"id": w.metadata.name, "mode": self.name, "status": (w.get("status") or {}).get("phase"),
                 "created": w.metadata.get("creationTimestamp"), "parent": None}
                for w in query_workflows(labels={"app.kubernetes.io/managed-by": "lamflow"})]

    def workflow(self, run: Run):
        from dflow import Workflow

        configure_argo(run.env)
        return Workflow(id=run.id, host=run.env.host, token=run.env.token, namespace=run.env.namespace)

    def status(self, run: Run) -> str:
        return run.workflow().query_status()

    def log(self, run: Run, step) -> str:
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

    def fetch(self, run: Run, artifact, out_dir: Path) -> list[Path]:
        from dflow import download_artifact

        download_artifact(artifact, path=str(out_dir))
        return [out_dir / p.name for p in out_dir.iterdir() if p.name != ".dflow"]

    def spec_problems(self, spec: PipelineSpec) -> list[str]:
        return image_problems(spec)

    def resubmit(self, run: Run, spec: PipelineSpec, *, reuse: list, rerun: set[str], keys: list[str],
                 progress) -> tuple[str, None]:
        progress(f"reusing {len(reuse)} succeeded step(s): {', '.join(sorted(display_key(st.key) for st in reuse)) or '-'}")
        env = run.env
        configure_argo(ArgoEnv.from_env(spec))
        same_data = spec is run.spec or dataset_digests(spec) == dataset_digests(run.spec)
        keys3 = run.meta["keys"] if same_data else input_keys(spec)
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


def submit_argo(spec: PipelineSpec, *, check_data: bool = True) -> str:
    """Validate, upload the inputs, render and POST the workflow; return its name."""
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
    """A retry reuses steps, for which dflow writes memoization ConfigMaps: route them through
    `_ConfigMapPoster`."""
    real = wf.get_k8s_core_v1_api
    wf.get_k8s_core_v1_api = lambda: _ConfigMapPoster(real())
