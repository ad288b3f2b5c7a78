"""Offline checks of deploy/: images, Argo install, RBAC, artifact store.

Two kinds of tests:
  * the CI script .ci/deploy-checks.sh (yamllint, hadolint, kustomize +
    kubernetes-validate, policy) passes on the real tree, and each check FAILS
    on a deliberately broken copy (so a check that silently passes everything
    would be caught);
  * direct assertions on the manifests: no real secret values, every image
    pinned, least-privilege RBAC, names that the pipeline code relies on.

Nothing here needs a cluster, a container engine or a registry. The script
installs its tools with pip (pinned) when they are missing; it never skips.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = ROOT / ".ci" / "deploy-checks.sh"
BASE = DEPLOY / "argo" / "base"
OVERLAYS = DEPLOY / "argo" / "overlays"
IMAGES = DEPLOY / "images"
TRAINER = DEPLOY / "trainer"

PLACEHOLDER = re.compile(r"^(REPLACE_ME[A-Z0-9_]*)?$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


# ----------------------------------------------------------------- helpers --


def run_checks(tree: Path, *only: str) -> subprocess.CompletedProcess:
    args = ["bash", str(SCRIPT)]
    for check in only:
        args += ["--only", check]
    args.append(str(tree))
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def assert_fails(result: subprocess.CompletedProcess, check: str, *needles: str) -> None:
    text = output(result)
    assert result.returncode != 0, f"{check} passed a broken tree:\n{text}"
    assert f"== {check}: FAIL" in text, text
    for needle in needles:
        assert needle in text, f"expected {needle!r} in the {check} output:\n{text}"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def all_docs(*paths: Path) -> list[dict]:
    return [d for p in paths for d in load_docs(p)]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def dockerfiles() -> list[Path]:
    return sorted(p for p in IMAGES.iterdir() if p.name.startswith("Dockerfile.")
                  and not p.name.endswith(".dockerignore"))


def image_is_pinned(ref: str) -> bool:
    if DIGEST.search(ref):
        return True
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


def images_in(node) -> list[str]:
    """Every value of an `image:` key anywhere in a parsed YAML document."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found += images_in(value)
    elif isinstance(node, list):
        for item in node:
            found += images_in(item)
    return found


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A copy of deploy/ to break. Local credential files (*.env) stay behind."""
    dst = tmp_path / "deploy"
    shutil.copytree(DEPLOY, dst, ignore=shutil.ignore_patterns("*.env"))
    return dst


@pytest.fixture(scope="module")
def real_tree_result() -> subprocess.CompletedProcess:
    return run_checks(DEPLOY)


# ------------------------------------------------- the CI script, real tree --


def test_all_deploy_checks_pass_on_the_real_tree(real_tree_result):
    text = output(real_tree_result)
    assert real_tree_result.returncode == 0, text
    for check in ("yamllint", "hadolint", "kustomize", "policy"):
        assert f"== {check}: PASS" in text, text


def test_every_overlay_is_rendered_and_validated_offline(real_tree_result):
    text = output(real_tree_result)
    for name in ("argo_base", "argo_overlays_install", "argo_overlays_minio", "argo_overlays_s3",
                 "trainer_overlays_install", "trainer_rbac"):
        assert f"{name}: valid for k8s" in text, text


# ------------------------------------------- the CI script, broken copies --


def test_yamllint_fails_on_a_yaml_syntax_error(deploy_copy):
    (deploy_copy / "argo" / "base" / "namespace.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [lamflow\n")
    result = run_checks(deploy_copy, "yamllint")
    assert_fails(result, "yamllint", "namespace.yaml", "syntax")


def test_hadolint_fails_on_unpinned_from_and_add(deploy_copy):
    (deploy_copy / "images" / "Dockerfile.bad").write_text(
        "FROM python\nADD . /src\nRUN pip install --no-cache-dir /src\n")
    result = run_checks(deploy_copy, "hadolint")
    assert_fails(result, "hadolint", "Dockerfile.bad", "DL3006", "DL3020")


def test_hadolint_fails_on_an_untrusted_registry(deploy_copy):
    cuda = deploy_copy / "images" / "Dockerfile.cuda"
    cuda.write_text(cuda.read_text().replace(
        "FROM ${UV_IMAGE} AS uv", "FROM registry.example.invalid/astral-sh/uv:0.13.8 AS uv"))
    result = run_checks(deploy_copy, "hadolint")
    assert_fails(result, "hadolint", "DL3026")


def test_policy_checks_the_default_of_a_base_image_build_argument(deploy_copy):
    # hadolint cannot see through `FROM ${BASE_IMAGE}`: the policy check resolves the ARG default
    cpu = deploy_copy / "images" / "Dockerfile.cpu"
    cpu.write_text(cpu.read_text().replace(
        "ARG BASE_IMAGE=python:3.12.15-slim-bookworm", "ARG BASE_IMAGE=registry.example.invalid/python:latest"))
    cuda = deploy_copy / "images" / "Dockerfile.cuda"
    cuda.write_text(cuda.read_text().replace("ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04", "ARG BASE_IMAGE"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "registry.example.invalid/python:latest (default of BASE_IMAGE) is not from a trusted",
                 "registry.example.invalid/python:latest uses tag 'latest'", "build argument BASE_IMAGE has no default")


def test_kustomize_check_fails_on_a_role_whose_rules_are_a_string(deploy_copy):
    # (kustomize itself already refuses to render this one)
    rbac = deploy_copy / "argo" / "base" / "workflow-executor-rbac.yaml"
    text = rbac.read_text()
    start = text.index("rules:\n")
    end = text.index("---", start)
    rbac.write_text(text[:start] + 'rules: "x"\n' + text[end:])
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "lamflow-workflow-executor")


def test_kustomize_check_fails_on_a_role_rule_that_violates_the_schema(deploy_copy):
    # kustomize renders this one; the schema validation must reject it.
    rbac = deploy_copy / "argo" / "base" / "workflow-executor-rbac.yaml"
    rbac.write_text(rbac.read_text().replace('verbs: ["create", "patch"]', "verbs: create"))
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "role/lamflow-workflow-executor", "'create' is not of type 'array'")


def test_kustomize_check_rejects_unknown_fields(deploy_copy):
    minio = deploy_copy / "argo" / "overlays" / "minio" / "minio.yaml"
    minio.write_text(minio.read_text().replace("imagePullPolicy: IfNotPresent", "imagePulPolicy: IfNotPresent", 1))
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "imagePulPolicy")


def test_kustomize_check_fails_on_a_non_numeric_container_port(deploy_copy):
    minio = deploy_copy / "argo" / "overlays" / "minio" / "minio.yaml"
    text = minio.read_text()
    assert "containerPort: 9000" in text
    minio.write_text(text.replace("containerPort: 9000", "containerPort: 'abc'"))
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "argo_overlays_minio", "deployment/minio")


def test_kustomize_check_fails_on_a_kind_it_cannot_validate(deploy_copy):
    extra = deploy_copy / "argo" / "base" / "extra.yaml"
    extra.write_text("apiVersion: argoproj.io/v1alpha1\nkind: WorkflowTemplate\n"
                     "metadata:\n  name: x\nspec:\n  entrypoint: main\n")
    kfile = deploy_copy / "argo" / "base" / "kustomization.yaml"
    kfile.write_text(kfile.read_text().replace("  - submitter-rbac.yaml\n",
                                               "  - submitter-rbac.yaml\n  - extra.yaml\n"))
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "without a schema")


def test_kustomize_check_fails_when_an_argo_patch_targets_nothing(deploy_copy):
    patch = deploy_copy / "argo" / "components" / "argo-config" / "workflow-controller-configmap.yaml"
    patch.write_text(patch.read_text().replace("name: workflow-controller-configmap",
                                               "name: workflow-controller-config"))
    result = run_checks(deploy_copy, "kustomize")
    assert_fails(result, "kustomize", "kubectl kustomize argo/overlays/install failed")


def test_policy_fails_on_a_secret_with_a_real_value(deploy_copy):
    (deploy_copy / "argo" / "base" / "leak.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: leak\n"
        f"data:\n  secretkey: {base64.b64encode(b'wJalrXUtnFEMI-real').decode()}\n")
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "leak.yaml", "non-placeholder")


def test_policy_fails_on_a_real_value_in_an_env_example(deploy_copy):
    env = deploy_copy / "argo" / "overlays" / "s3" / "s3.env.example"
    env.write_text(env.read_text().replace("REPLACE_ME_SECRET_KEY", "wJalrXUtnFEMI-real"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "s3.env.example", "secretkey")


def test_policy_fails_on_latest_and_untagged_images(deploy_copy):
    minio = deploy_copy / "argo" / "overlays" / "minio" / "minio.yaml"
    minio.write_text(re.sub(r"quay\.io/minio/minio:\S+", "quay.io/minio/minio:latest", minio.read_text()))
    cuda = deploy_copy / "images" / "Dockerfile.cuda"
    cuda.write_text(cuda.read_text().replace("ghcr.io/astral-sh/uv:0.13.8", "ghcr.io/astral-sh/uv"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "quay.io/minio/minio:latest", "ghcr.io/astral-sh/uv has neither")


def test_policy_fails_on_an_unpinned_remote_argo_release(deploy_copy):
    kfile = deploy_copy / "argo" / "overlays" / "install" / "kustomization.yaml"
    kfile.write_text(kfile.read_text().replace("releases/download/v4.1.2/", "releases/latest/download/"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "not pinned")


def test_policy_fails_on_wildcard_or_secret_rbac(deploy_copy):
    rbac = deploy_copy / "argo" / "base" / "submitter-rbac.yaml"
    rbac.write_text(rbac.read_text().replace('resources: ["configmaps"]', 'resources: ["configmaps", "secrets"]')
                    .replace('resources: ["workflowtemplates"]', 'resources: ["*"]'))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "grants access to Secrets", "wildcard in resources")


# ------------------------------------------------- secrets and image pins --


def test_no_secret_in_deploy_holds_a_real_value():
    secrets = [(p, d) for p in DEPLOY.rglob("*.y*ml") for d in load_docs(p) if d.get("kind") == "Secret"]
    for path, secret in secrets:
        for field in ("data", "stringData"):
            for key, value in (secret.get(field) or {}).items():
                text = base64.b64decode(value).decode() if field == "data" else str(value)
                assert PLACEHOLDER.match(text), f"{path}: {field}.{key} is not a placeholder"
    examples = sorted(DEPLOY.rglob("*.env.example"))
    assert examples, "secretGenerators read *.env files made from committed *.env.example files"
    for path in examples:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert PLACEHOLDER.match(value.strip()), f"{path}: {key} is not a placeholder"


def test_secret_generator_env_files_are_gitignored_and_not_tracked():
    env_files = []
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        for gen in yaml.safe_load(kfile.read_text()).get("secretGenerator") or []:
            for env in gen.get("envs") or []:
                env_files.append(kfile.parent / env)
                assert (kfile.parent / (env + ".example")).is_file(), f"{kfile}: no {env}.example"
    assert env_files
    for env in env_files:
        rel = env.relative_to(ROOT)
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", str(rel)], cwd=ROOT)
        assert ignored.returncode == 0, f"{rel} must be gitignored (it holds real credentials)"
    tracked = subprocess.run(["git", "ls-files", "--", "deploy"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [t for t in tracked if t.endswith(".env")], tracked


def test_every_image_in_deploy_is_pinned():
    refs = []
    for path in DEPLOY.rglob("*.y*ml"):
        refs += [(path, ref) for doc in load_docs(path) for ref in images_in(doc)]
    for path in dockerfiles():
        stages = set()
        text = path.read_text()
        defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)$", text.split("\nFROM ", 1)[0], re.M))  # `FROM ${BASE_IMAGE}`
        for line in text.splitlines():
            m = re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line)
            if m:
                ref = re.sub(r"^\$\{(\w+)\}$", lambda a: defaults.get(a.group(1), a.group(0)), m.group(1))
                if ref not in stages:
                    refs.append((path, ref))
                if m.group(2):
                    stages.add(m.group(2))
            m = re.match(r"^COPY\s+--from=(\S+)", line)
            if m and m.group(1) not in stages:
                refs.append((path, m.group(1)))
    assert len(refs) >= 6, refs
    unpinned = [(str(p.relative_to(ROOT)), r) for p, r in refs if not image_is_pinned(r)]
    assert not unpinned, unpinned


def test_install_overlay_pins_the_argo_v4_release():
    kust = yaml.safe_load((OVERLAYS / "install" / "kustomization.yaml").read_text())
    remote = [r for r in kust["resources"] if r.startswith("https://")]
    assert remote == ["https://github.com/argoproj/argo-workflows/releases/download/v4.1.2/install.yaml"]
    assert kust["namespace"] == "argo"
    assert "../../components/argo-config" in kust["components"]


def test_trainer_overlay_pins_the_kubeflow_trainer_v2_3_0_release():
    kust = yaml.safe_load((TRAINER / "overlays" / "install" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"]
    text = (TRAINER / "overlays" / "install" / "kustomization.yaml").read_text()
    assert "manifests/overlays/runtimes?ref=v2.3.0" in text  # the runtimes step, same tag


def test_policy_fails_on_an_unpinned_trainer_release(deploy_copy):
    kfile = deploy_copy / "trainer" / "overlays" / "install" / "kustomization.yaml"
    kfile.write_text(kfile.read_text().replace("manager?ref=v2.3.0", "manager?ref=master"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "not pinned", "kubeflow/trainer")


def test_policy_fails_on_a_cluster_wide_trainjob_grant(deploy_copy):
    rbac = deploy_copy / "trainer" / "rbac" / "trainjob-rbac.yaml"
    rbac.write_text(rbac.read_text().replace("kind: Role\n", "kind: ClusterRole\n", 1)
                    .replace("  namespace: lamflow\nrules:", "rules:", 1).replace("  kind: Role\n", "  kind: ClusterRole\n"))
    result = run_checks(deploy_copy, "policy")
    assert_fails(result, "policy", "ClusterRole lamflow-trainjobs")


def test_workflow_pods_may_create_get_watch_delete_trainjobs_in_their_namespace_only():
    docs = all_docs(TRAINER / "rbac" / "trainjob-rbac.yaml")
    role = find(docs, "Role", "lamflow-trainjobs")
    assert role["metadata"]["namespace"] == "lamflow"
    assert role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                              "verbs": ["create", "get", "watch", "delete"]}]
    binding = find(docs, "RoleBinding", "lamflow-trainjobs")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lamflow-trainjobs"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "argo", "namespace": "lamflow"}]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_readme_documents_multinode_training_and_gang_scheduling():
    readme = (DEPLOY / "README.md").read_text()
    for needle in ("kubectl apply --server-side -k deploy/trainer/overlays/install", "deploy/trainer/rbac",
                   "podGroupPolicy", "Volcano", "coscheduling", "torch-distributed", "trainer_runtime"):
        assert needle in readme, f"deploy/README.md does not mention {needle}"


# ------------------------------------------------------------------- RBAC --


def test_workflow_pods_run_as_service_account_argo_with_executor_rights_only():
    docs = all_docs(BASE / "workflow-executor-rbac.yaml")
    sa = find(docs, "ServiceAccount", "argo")  # dflow hard-codes serviceAccountName: argo
    assert sa["metadata"]["namespace"] == "lamflow"
    role = find(docs, "Role", "lamflow-workflow-executor")
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                              "verbs": ["create", "patch"]}]
    binding = find(docs, "RoleBinding", "lamflow-workflow-executor")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "lamflow-workflow-executor"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "argo", "namespace": "lamflow"}]


def test_submitter_role_grants_what_the_cli_needs_and_nothing_more():
    docs = all_docs(BASE / "submitter-rbac.yaml")
    find(docs, "ServiceAccount", "lamflow-submitter")
    grants = {}
    for rule in find(docs, "Role", "lamflow-submitter")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    assert grants == {
        ("argoproj.io", "workflows"): {"create", "get", "list", "watch", "update", "patch", "delete"},
        ("argoproj.io", "workflowtemplates"): {"get", "list"},
        ("", "pods"): {"get", "list", "watch", "delete"},
        ("", "pods/log"): {"get"},
        ("", "configmaps"): {"get", "list", "create"},
    }
    binding = find(docs, "RoleBinding", "lamflow-submitter")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lamflow-submitter", "namespace": "lamflow"}]
    token = find(docs, "Secret", "lamflow-submitter-token")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert token["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "lamflow-submitter"}
    assert "data" not in token and "stringData" not in token


# ------------------------------------------------------ artifact repository --


@pytest.mark.parametrize("overlay", ["minio", "s3"])
def test_artifact_repository_is_the_namespace_default_and_uses_the_generated_secret(overlay):
    cm = find(load_docs(OVERLAYS / overlay / "artifact-repositories.yaml"), "ConfigMap", "artifact-repositories")
    assert cm["metadata"]["namespace"] == "lamflow"
    key = cm["metadata"]["annotations"]["workflows.argoproj.io/default-artifact-repository"]
    assert key == "lamflow-s3"  # the pipeline's engine.artifact_repo_key
    s3 = yaml.safe_load(cm["data"][key])["s3"]
    assert s3["bucket"] and s3["endpoint"]
    gens = yaml.safe_load((OVERLAYS / overlay / "kustomization.yaml").read_text())["secretGenerator"]
    generated = {(g["name"], g["namespace"]) for g in gens}
    env_keys = {line.partition("=")[0] for line in (OVERLAYS / overlay / "s3.env.example").read_text().splitlines()
                if line and not line.startswith("#")}
    for ref in (s3["accessKeySecret"], s3["secretKeySecret"]):
        assert (ref["name"], "lamflow") in generated
        assert ref["key"] in env_keys
    no_hash = [g for g in gens if g["name"] == s3["accessKeySecret"]["name"]]
    assert all(g["options"]["disableNameSuffixHash"] for g in no_hash)


def test_minio_bucket_name_is_the_same_in_repository_policy_and_setup_job():
    overlay = OVERLAYS / "minio"
    cm = find(load_docs(overlay / "artifact-repositories.yaml"), "ConfigMap", "artifact-repositories")
    s3 = yaml.safe_load(cm["data"]["lamflow-s3"])["s3"]
    setup = load_docs(overlay / "minio-setup.yaml")
    job = find(setup, "Job", "minio-setup")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BUCKET"] == s3["bucket"]
    assert env["MINIO_URL"] == f"http://{s3['endpoint']}"
    policy = yaml.safe_load(find(setup, "ConfigMap", "minio-setup")["data"]["policy.json"])
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{s3['bucket']}", f"arn:aws:s3:::{s3['bucket']}/*"}
    service = find(load_docs(overlay / "minio.yaml"), "Service", "minio")
    assert s3["endpoint"] == f"minio.{service['metadata']['namespace']}.svc:9000"


# ----------------------------------------------------------------- images --


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_step_image_is_multi_stage_non_root_and_installs_lamflow_from_the_repo(name):
    text = (IMAGES / name).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len([f for f in froms if "/uv:" not in f]) >= 2, froms
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] == "1000:1000", users
    assert re.search(r"^COPY pyproject\.toml README\.md \./$", text, re.M)
    assert re.search(r"pip install (--no-cache-dir )?\.", text)
    assert "torch==2.13.0" in text
    assert "constraints.txt" in text


def test_cpu_image_takes_torch_from_the_pytorch_cpu_index():
    text = (IMAGES / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert '"torch==2.13.0+cpu"' in text


def test_dockerignore_whitelists_every_path_the_dockerfiles_copy():
    for dockerfile in dockerfiles():
        ignore = (dockerfile.parent / (dockerfile.name + ".dockerignore")).read_text().splitlines()
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        assert "*" in ignore
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert src.rstrip("/") in allowed, f"{dockerfile.name}: {src} is excluded from the context"
                    assert (ROOT / src).exists() or src == "README.md", f"{dockerfile.name}: {src} does not exist"


def test_constraints_pin_every_direct_dependency_of_the_package():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for spec in project["project"]["dependencies"] + project["build-system"]["requires"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in deploy/images/constraints.txt: run deploy/images/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, pyproject wants {spec}: run deploy/images/lock.sh")


# ------------------------------------------------------------------- docs --


def test_readme_documents_the_cli_contract_and_what_was_not_run():
    readme = (DEPLOY / "README.md").read_text()
    for name in ("LAMFLOW_ARGO_HOST", "LAMFLOW_ARGO_TOKEN", "LAMFLOW_NAMESPACE", "LAMFLOW_S3_ENDPOINT",
                 "LAMFLOW_S3_ACCESS_KEY", "LAMFLOW_S3_SECRET_KEY", "LAMFLOW_S3_BUCKET",
                 "host:", "namespace:", "artifact_repo_key:", "service_account:",
                 "lamflow submit templates/quickstart.yaml", "nvidia.com/gpu.product",
                 "kubectl apply --server-side -k deploy/argo/overlays/install"):
        assert name in readme, f"deploy/README.md does not mention {name}"
    assert "not applied to a real cluster" in readme
    images = (IMAGES / "README.md").read_text()
    assert "The CPU image was built and run here" in images and "A GPU run of the CUDA image" in images
