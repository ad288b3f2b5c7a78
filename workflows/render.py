"""A pipeline as an Argo Workflow: the dflow Workflow built for Argo (templates with blank secrets
and seeded names) and its manifest, offline. `render_manifest` gives the same bytes that
`lamflow render` writes and `lamflow submit` POSTs (backends/argo.py)."""

from __future__ import annotations

import json
import os

from .dag import BuildOptions, build_workflow
from .dflow_config import ArgoEnv, import_dflow_offline, offline, scrubbed
from .inputs import dataset_digests, input_keys, s3_inputs
from .spec import PipelineSpec, resolved_type_map, spec_summary
from .trainjob import add_trainjob_stage

LABEL = "lamflow.io/pipeline"
ANNOTATION = "lamflow.io/spec"  # the resolved spec and inputs, for `lamflow retry` of an Argo run


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
                                checkpoint_run=checkpoint_run or "{{workflow.name}}",
                                multinode=add_trainjob_stage)
            return build_workflow(spec, s3_inputs(keys), opts,
                                  labels=labels, annotations=annotations, seed=json.dumps(summary, sort_keys=True), **kw)
    finally:
        config["mode"], config["util_image"] = saved
