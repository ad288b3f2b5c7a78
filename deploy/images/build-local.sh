#!/usr/bin/env bash
# Build a lamflow step image where no container registry can be reached, with
# the same Dockerfile as the production build; only the base image (and where
# torch comes from) differ:
#
#   1. Base image from Debian's packages alone: `debootstrap --variant=minbase
#      bookworm` + python3, python3-venv, ca-certificates (+ bookworm-updates and
#      bookworm-security), then `docker import`. Its tag is a hash of the recipe
#      (the build_base function below and its package list), so a second run
#      reuses it; --rebuild-base makes a fresh one (new security updates).
#   2. The step image: `docker build -f deploy/images/Dockerfile.<flavor>
#      --build-arg BASE_IMAGE=<that base>`. pip reaches PyPI through the host
#      network during the build (`--network host`); nothing else reaches out.
#      cpu:  torch==2.13.0+cpu comes from a local wheel served on 127.0.0.1 when
#            one is found for the base's Python (LAMFLOW_TORCH_WHEEL, the
#            directories in PIP_FIND_LINKS, /opt/wheels), else from the PyTorch
#            CPU index (the production default).
#      cuda: torch==2.13.0 (CUDA 13.0) and its nvidia-* wheels from PyPI; uv
#            0.13.8 from PyPI (the uv image is on ghcr.io); Python is the base's
#            python3 (uv's CPython download is on GitHub): PYTHON_SOURCE=system.
#   3. Checks on the result: runs as a non-root user, no C compiler,
#      `lamflow --help` works with `--network none`, the expected torch (and no
#      nvidia-* package in the CPU image).
#
# Usage: deploy/images/build-local.sh [--flavor cpu|cuda] [--tag TAG] [--rebuild-base] [--base-only]
# Prints the image tag on the last line of stdout. Needs root (debootstrap),
# a running Docker daemon, debootstrap, python3.
# Environment: LAMFLOW_DEBIAN_MIRROR, LAMFLOW_DEBIAN_SECURITY_MIRROR (default: the
# mirrors apt uses here, else deb.debian.org),
# LAMFLOW_TORCH_WHEEL, DOCKER (docker CLI, default `docker`).
set -euo pipefail

SUITE=bookworm
BASE_PACKAGES=(python3 python3-venv ca-certificates)
UV_VERSION=0.13.8

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
flavor=cpu
tag=""
rebuild_base=0
base_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --flavor) flavor="${2:?}"; shift 2 ;;
        --tag) tag="${2:?}"; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        --base-only) base_only=1; shift ;;
        -h|--help) sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-local: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "${flavor}" in cpu|cuda) ;; *) echo "build-local: --flavor cpu or cuda, not '${flavor}'" >&2; exit 2 ;; esac

DOCKER="${DOCKER:-docker}"
log() { printf 'build-local: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s; }

work="$(mktemp -d "${TMPDIR:-/tmp}/lamflow-build-local.XXXXXX")"
server_pid=""
cleanup() {
    if [[ -n "${server_pid}" ]]; then kill "${server_pid}" 2>/dev/null || true; fi
    # whatever is still mounted in the rootfs (an interrupted debootstrap or chroot), then the files
    local m
    while read -r m; do umount -l "$m" 2>/dev/null || true; done \
        < <(awk -v w="${work}/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r)
    rm -rf --one-file-system "${work}"
}
trap cleanup EXIT

"${DOCKER}" info >/dev/null 2>&1 || die "no Docker daemon answers '${DOCKER} info' (start dockerd first)"

# A docker CLI with BuildKit: BuildKit reads Dockerfile.<flavor>.dockerignore (the
# legacy builder would send the whole repository). Docker >= 23 needs the buildx
# plugin for it; Debian's docker.io 20.10 CLI has BuildKit built in.
builder_cli() {
    if "${DOCKER}" buildx version >/dev/null 2>&1; then echo "${DOCKER}"; return; fi
    local c
    for c in "${DOCKER}" /usr/bin/docker; do
        if command -v "$c" >/dev/null && "$c" version --format '{{.Client.Version}}' 2>/dev/null | grep -Eq '^(19|20|21|22)\.'; then
            echo "$c"; return
        fi
    done
    die "no docker CLI with BuildKit: install the buildx plugin, or Debian's docker.io (its /usr/bin/docker)"
}

apt_mirror() {  # $1 = archive name (debian, debian-security): the first such URL apt uses here
    grep -hoE "https?://[^[:space:]]+/$1/?([[:space:]]|\$)" \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | head -n1 | tr -d '[:space:]' | sed 's#/$##' || true
}
mirror="${LAMFLOW_DEBIAN_MIRROR:-$(apt_mirror debian)}"
mirror="${mirror:-http://deb.debian.org/debian}"
security_mirror="${LAMFLOW_DEBIAN_SECURITY_MIRROR:-$(apt_mirror debian-security)}"
security_mirror="${security_mirror:-http://deb.debian.org/debian-security}"

# The CA bundle this machine trusts (PIP_CERT, else pip's `cert` setting, else the system
# bundle): behind a TLS-intercepting proxy, pip in the build needs it too. It goes in as a
# build secret: mounted for the install steps only, stored in no layer.
pip_ca="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
pip_ca="${pip_ca:-/etc/ssl/certs/ca-certificates.crt}"
secret=()
if [[ -n "${pip_ca}" && -s "${pip_ca}" ]]; then secret=(--secret "id=pip-ca,src=${pip_ca}"); fi

# ------------------------------------------------------------------ base ----

# The recipe of the base image. Its text (with SUITE and BASE_PACKAGES) is the
# cache key: change anything here and the next run builds a new base.
build_base() {  # $1 = rootfs dir, $2 = Debian mirror, $3 = Debian security mirror
    local rootfs="$1" mirror="$2" security="$3" pkgs
    pkgs="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
    debootstrap --variant=minbase --include="${pkgs}" "${SUITE}" "${rootfs}" "${mirror}" >"${work}/debootstrap.log" 2>&1 \
        || { tail -n 30 "${work}/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    cat > "${rootfs}/etc/apt/sources.list" <<EOF
deb ${mirror} ${SUITE} main
deb ${mirror} ${SUITE}-updates main
deb ${security} ${SUITE}-security main
EOF
    mount -t proc proc "${rootfs}/proc"
    chroot "${rootfs}" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get -q update && apt-get -q -y upgrade && apt-get -q -y clean' >"${work}/upgrade.log" 2>&1 \
        || { umount "${rootfs}/proc"; tail -n 30 "${work}/upgrade.log" >&2; die "security upgrade in the base failed (log above)"; }
    umount "${rootfs}/proc"
    # the public mirror in the image, whatever mirror built it
    sed -i "s#${mirror}#http://deb.debian.org/debian#; s#${security}#http://deb.debian.org/debian-security#" \
        "${rootfs}/etc/apt/sources.list"
    rm -rf "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/var/cache/apt/*.bin "${rootfs}"/var/log/*.log \
           "${rootfs}"/var/log/apt/* "${rootfs}"/tmp/* "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/info/*
    find "${rootfs}/usr/share/doc" -type f ! -name copyright -delete
}

base_key() {
    { declare -f build_base; echo "${SUITE}"; printf '%s\n' "${BASE_PACKAGES[@]}"; } | sha256sum | cut -c1-12
}

base_tag="lamflow-base:${SUITE}-$(base_key)"

ensure_base() {
    if [[ ${rebuild_base} -eq 0 ]] && "${DOCKER}" image inspect "${base_tag}" >/dev/null 2>&1; then
        log "base ${base_tag}: cached"
        return
    fi
    [[ "$(id -u)" -eq 0 ]] || die "building the base image needs root (debootstrap, chroot)"
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    local t0
    t0="$(now)"
    log "base ${base_tag}: debootstrap ${SUITE} from ${mirror} (updates from ${security_mirror}) ..."
    build_base "${work}/rootfs" "${mirror}" "${security_mirror}"
    tar --numeric-owner -C "${work}/rootfs" -c . | "${DOCKER}" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --change "LABEL io.lamflow.base.recipe=$(base_key) io.lamflow.base.packages=$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
        --message "debootstrap --variant=minbase ${SUITE} + ${BASE_PACKAGES[*]}" \
        - "${base_tag}" >/dev/null
    rm -rf "${work}/rootfs"
    log "base ${base_tag}: built in $(( $(now) - t0 )) s, $(image_mb "${base_tag}") MB"
}

image_mb() { "${DOCKER}" image inspect -f '{{.Size}}' "$1" | awk '{printf "%d", $1 / 1e6}'; }

# ------------------------------------------------------------- torch (cpu) --

# Serve a local torch-2.13.0+cpu wheel for the base's Python as a one-package
# index on 127.0.0.1 (the build's RUN steps share the host network). Sets
# torch_index to its URL; leaves it empty when no such wheel is here.
torch_index=""
local_torch_index() {
    local abi wheel="" d
    abi="$("${DOCKER}" run --rm --network none "${base_tag}" python3 -c \
            'import sys; print("cp%d%d" % sys.version_info[:2])')"
    if [[ -n "${LAMFLOW_TORCH_WHEEL:-}" ]]; then
        wheel="${LAMFLOW_TORCH_WHEEL}"
    else
        for d in ${PIP_FIND_LINKS:-} /opt/wheels; do
            d="${d#file://}"
            [[ -d "$d" ]] || continue
            wheel="$(find "$d" -maxdepth 1 -name "torch-2.13.0+cpu-${abi}-${abi}-*manylinux*_x86_64.whl" | sort | head -n1)"
            [[ -n "${wheel}" ]] && break
        done
    fi
    [[ -n "${wheel}" ]] || return 0
    [[ -f "${wheel}" ]] || die "LAMFLOW_TORCH_WHEEL=${wheel}: no such file"
    mkdir -p "${work}/index/simple/torch"
    ln -s "$(readlink -f "${wheel}")" "${work}/index/simple/torch/$(basename "${wheel}")"
    local sha name
    sha="$(sha256sum "${wheel}" | cut -d' ' -f1)"
    name="$(basename "${wheel}")"
    printf '<!DOCTYPE html><html><body><a href="%s#sha256=%s">%s</a></body></html>\n' \
        "${name//+/%2B}" "${sha}" "${name}" > "${work}/index/simple/torch/index.html"
    # the index URL is a build argument, part of the layer cache key: derive the port from the
    # wheel's hash (the same URL every run), the first free one from there
    local port
    port="$(python3 - "${sha}" <<'PY'
import socket, sys
start = 20000 + int(sys.argv[1][:8], 16) % 20000
for port in range(start, start + 50):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
PY
)"
    [[ -n "${port}" ]] || die "no free port on 127.0.0.1 for the torch index"
    python3 -m http.server --bind 127.0.0.1 --directory "${work}/index" "${port}" >"${work}/http.log" 2>&1 &
    server_pid=$!
    local i
    for i in $(seq 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${port}/simple/torch/')" 2>/dev/null && break
        sleep 0.1
    done
    log "torch: ${wheel} (served on 127.0.0.1:${port})"
    torch_index="http://127.0.0.1:${port}/simple"
}

# ---------------------------------------------------------------- uv (cuda) --

ensure_uv_image() {  # the uv binary from PyPI in an image with /uv, like ghcr.io/astral-sh/uv
    local uv_tag="lamflow-uv:${UV_VERSION}-$(base_key)"
    if ! "${DOCKER}" image inspect "${uv_tag}" >/dev/null 2>&1; then
        DOCKER_BUILDKIT=1 "$(builder_cli)" build --network host "${secret[@]}" -q -t "${uv_tag}" - >/dev/null <<EOF
FROM ${base_tag}
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /tmp/uv && /tmp/uv/bin/pip install --no-cache-dir --disable-pip-version-check uv==${UV_VERSION} \
 && cp /tmp/uv/bin/uv /tmp/uv/bin/uvx / && rm -rf /tmp/uv
EOF
    fi
    echo "${uv_tag}"
}

# ------------------------------------------------------------------ main ----

t_all="$(now)"
ensure_base
if [[ ${base_only} -eq 1 ]]; then
    echo "${base_tag}"
    exit 0
fi

version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "${root}/pyproject.toml")"
revision="$(git -C "${root}" rev-parse HEAD 2>/dev/null || echo unknown)"
tag="${tag:-lamflow:${version}-local-${flavor}}"
args=(--build-arg "BASE_IMAGE=${base_tag}" --build-arg "LAMFLOW_VERSION=${version}" --build-arg "LAMFLOW_REVISION=${revision}")
if [[ "${flavor}" == cpu ]]; then
    local_torch_index
    if [[ -n "${torch_index}" ]]; then
        args+=(--build-arg "TORCH_INDEX_URL=${torch_index}")
    else
        log "torch: no local torch-2.13.0+cpu wheel for the base's Python; using the PyTorch CPU index"
    fi
else
    args+=(--build-arg "UV_IMAGE=$(ensure_uv_image)" --build-arg PYTHON_SOURCE=system)
fi

t0="$(now)"
log "image ${tag}: docker build -f deploy/images/Dockerfile.${flavor} ..."
DOCKER_BUILDKIT=1 "$(builder_cli)" build --network host --progress plain "${secret[@]}" \
    -f "${root}/deploy/images/Dockerfile.${flavor}" "${args[@]}" -t "${tag}" "${root}" >"${work}/build.log" 2>&1 \
    || { tail -n 60 "${work}/build.log" >&2; die "docker build failed (log above)"; }
log "image ${tag}: built in $(( $(now) - t0 )) s, $(image_mb "${tag}") MB"

# ---------------------------------------------------------------- checks ----

run() { "${DOCKER}" run --rm -i --network none "${tag}" "$@"; }
uid="$(run id -u </dev/null)"
[[ "${uid}" != 0 ]] || die "${tag}: runs as root"
compilers="$(run sh -c 'for c in cc gcc g++ c++ clang tcc; do command -v "$c"; done; true' </dev/null)"
[[ -z "${compilers}" ]] || die "${tag}: has a compiler: ${compilers}"
run lamflow --help >/dev/null </dev/null || die "${tag}: 'lamflow --help' failed"
want_torch=$([[ "${flavor}" == cpu ]] && echo 2.13.0+cpu || echo 2.13.0)
run python3 - "${want_torch}" "${flavor}" <<'PY' 2>&1 || die "${tag}: package check failed"
import sys
from importlib import metadata

import torch

want, flavor = sys.argv[1], sys.argv[2]
# the CPU wheel is 2.13.0+cpu; PyPI's CUDA wheel calls itself 2.13.0+cu130
assert torch.__version__ == want if flavor == "cpu" else torch.__version__.split("+")[0] == want, torch.__version__
cuda = sorted(d.metadata["Name"] for d in metadata.distributions()
              if d.metadata["Name"].lower().startswith(("nvidia-", "triton", "cuda-")))
if flavor == "cpu":
    assert not cuda, f"CUDA packages in the CPU image: {cuda}"
else:
    assert torch.version.cuda and torch.version.cuda.startswith("13.0"), torch.version.cuda
print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {len(cuda)} CUDA packages")
PY
log "image ${tag}: uid ${uid}, no compiler, 'lamflow --help' runs with --network none; total $(( $(now) - t_all )) s"
echo "${tag}"
