#!/usr/bin/env bash
# Container check: the quickstart with every step in the locally built CPU step image.
#
#   1. docker.io and debootstrap from Debian's packages when missing; dockerd started with
#      --bridge=none --iptables=false (it creates no network of its own) unless one answers
#      already; stopped again at the end if this script started it.
#   2. deploy/images/build-local.sh builds the image (Debian debootstrap base + PyPI; the base and
#      the layers are cached in /var/lib/docker between runs).
#   3. templates/quickstart.yaml runs twice, at the same time: `lamflow submit --debug
#      --container docker` (every step in the image, --network none) and `lamflow submit --debug`
#      (every step a local process). Both must succeed, and their outputs must agree: the same
#      output files in the same places, every number of the report's summary.json within float
#      tolerance, the same checkpoints (weights within tolerance), and the container run's step
#      scripts must be docker runs with no network.
#
# Any failure fails the check (exit 1); nothing is skipped. LAMFLOW_CONTAINER_CHECK=0 turns the
# whole check off (machines without Docker). Needs root (apt-get, dockerd, debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

log() { printf 'container-check: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s; }

if [[ "${LAMFLOW_CONTAINER_CHECK:-1}" == 0 ]]; then
    log "off (LAMFLOW_CONTAINER_CHECK=0)"
    exit 0
fi
t_start="$(now)"
[[ "$(id -u)" -eq 0 ]] || die "needs root (apt-get, dockerd, debootstrap); LAMFLOW_CONTAINER_CHECK=0 turns it off"

work="$(mktemp -d "${TMPDIR:-/tmp}/container-check.XXXXXX")"
dockerd_pid=""
cleanup() {
    local rc=$?
    if [[ -n "${dockerd_pid}" ]]; then
        log "stopping the dockerd it started (pid ${dockerd_pid})"
        kill "${dockerd_pid}" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "${dockerd_pid}" 2>/dev/null || break; sleep 0.5; done
        kill -0 "${dockerd_pid}" 2>/dev/null && { log "dockerd did not stop: killing it"; kill -9 "${dockerd_pid}" || true; }
    fi
    rm -rf "${work}"
    exit "${rc}"
}
trap cleanup EXIT

# ---------------------------------------------------------------- engine ----

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]} (Debian packages)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"${work}/apt.log" 2>&1 || { tail -n 30 "${work}/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
fi

if docker info >/dev/null 2>&1; then
    log "using the Docker daemon that is already running"
else
    log "starting dockerd --bridge=none --iptables=false"
    dockerd --bridge=none --iptables=false --ip-masq=false >"${work}/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -n 30 "${work}/dockerd.log" >&2; die "dockerd did not come up"; }
    networks="$(docker network ls --format '{{.Name}}' | sort | tr '\n' ' ')"
    [[ "${networks}" == "host none " ]] || die "dockerd created networks: ${networks}"
fi

# ----------------------------------------------------------------- image ----

t0="$(now)"
image="$(deploy/images/build-local.sh --flavor cpu | tail -n 1)" || die "deploy/images/build-local.sh failed"
t_build=$(( $(now) - t0 ))
size_mb="$(docker image inspect -f '{{.Size}}' "${image}" | awk '{printf "%d", $1 / 1e6}')"
if docker run --rm --network none "${image}" python3 -c \
        'import socket; socket.create_connection(("pypi.org", 443), timeout=5)' >/dev/null 2>&1; then
    die "a container with --network none reached pypi.org"
fi

# ------------------------------------------------------------ quickstart ----

# the quickstart's layout (its data paths are relative to templates/), outside the checkout
mkdir -p "${work}/qs/templates"
cp -R examples "${work}/qs/examples"
cp templates/quickstart.yaml "${work}/qs/templates/quickstart.yaml"
pipe="${work}/qs/templates/quickstart.yaml"

submit() {  # name, extra args...
    local name="$1"; shift
    local t0 rc=0
    t0="$(now)"
    lamflow submit "${pipe}" --debug --workdir "${work}/${name}" "$@" >"${work}/${name}.log" 2>&1 || rc=$?
    echo "$(( $(now) - t0 ))" >"${work}/${name}.seconds"
    return "${rc}"
}
log "quickstart: in containers (${image}) and as processes, side by side ..."
submit containers --container docker --container-image "${image}" & pid_c=$!
submit processes & pid_p=$!
rc_c=0; rc_p=0
wait "${pid_c}" || rc_c=$?
wait "${pid_p}" || rc_p=$?
[[ ${rc_c} -eq 0 ]] || { tail -n 40 "${work}/containers.log" >&2; die "the quickstart in containers failed"; }
[[ ${rc_p} -eq 0 ]] || { tail -n 40 "${work}/processes.log" >&2; die "the quickstart as processes failed"; }
run_of() { grep -m1 -oE '^run [^:]+' "${work}/$1.log" | cut -d' ' -f2; }
rid_c="$(run_of containers)"; rid_p="$(run_of processes)"
for side in containers processes; do
    rid="$(run_of "${side}")"
    lamflow download "${rid}" -o "${work}/${side}-report" --workdir "${work}/${side}" >/dev/null \
        || die "lamflow download ${rid} (${side}) failed"
done

python3 - "${work}/containers/${rid_c}" "${work}/processes/${rid_p}" \
          "${work}/containers-report" "${work}/processes-report" <<'PY' || die "the two runs disagree (above)"
"""Container run vs process run of the same spec and seeds."""
import json
import math
import re
import os
import sys
from pathlib import Path

import torch

from lamflow.model.io.checkpoint import load_model

run_c, run_p, rep_c, rep_p = map(Path, sys.argv[1:])
RTOL, ATOL = 1e-5, 1e-7
problems = []


def outputs(run):
    """{output artifact of a keyed step: sorted relative paths of its files}. dflow's helper steps
    and catalogs (.dflow) have random names and are left out."""
    found = {}
    for step in sorted(run.iterdir()):
        arts = step / "outputs" / "artifacts"
        if "init-artifact" in step.name or not arts.is_dir():
            continue
        for art in sorted(arts.iterdir()):
            files = []
            for dirpath, dirs, names in os.walk(art, followlinks=True):
                dirs[:] = [d for d in dirs if d != ".dflow"]
                files += [str((Path(dirpath) / f).relative_to(art)) for f in names]
            found[str(art.relative_to(run))] = sorted(files)
    return found


# 1. the same output artifacts, with the same files. Inside an artifact, a stage may name its files
#    after its inputs' real paths: those are the data's own folders in a process run (symlinks) and
#    copies in a container (as on Argo); such a path difference is printed, the names must agree.
oc, op = outputs(run_c), outputs(run_p)
if sorted(oc) != sorted(op):
    problems.append(f"output artifacts differ: only in containers {sorted(set(oc) - set(op))}, "
                    f"only as processes {sorted(set(op) - set(oc))}")
for art in sorted(set(oc) & set(op)):
    if oc[art] != op[art]:
        names = lambda files: sorted(Path(f).name for f in files)  # noqa: E731
        if names(oc[art]) != names(op[art]):
            problems.append(f"{art}: different files ({len(oc[art])} in containers, {len(op[art])} as processes)")
        else:
            c, p = next((c, p) for c, p in zip(oc[art], op[art]) if c != p)
            print(f"note: {art}: the same {len(oc[art])} files, laid out differently, e.g. {c} (containers) "
                  f"vs {p} (processes)")
print(f"outputs: {len(oc)} artifacts, {sum(map(len, oc.values()))} files in the container run")

# 2. every step ran as a docker run with no network
steps = sorted(p.parent.name for p in run_c.glob("*/script"))
for s in steps:
    text = (run_c / s / "script").read_text()
    if "docker run --rm --network none" not in text:
        problems.append(f"{s}: its script is not a `docker run --rm --network none`")
print(f"container run: {len(steps)} steps, each a `docker run --rm --network none`: {', '.join(steps)}")

# 3. the report: same keys, numbers within tolerance (wall times excluded)
def is_timing(key):
    """Wall times and speed ratios: measured, not computed, so they differ between any two runs."""
    k = str(key).lower()
    return (k.endswith(("_s", "_seconds", "_time")) or k.startswith("seconds") or k in ("created", "finished", "time")
            or any(w in k for w in ("wall", "speedup", "elapsed", "duration", "per_sec", "steps_per", "us_per")))


# names of staged data: a process run stages symlinks, a container run real copies, and the clean
# stage names its outputs after the resolved input paths, so these differ while the data are the same
NAME_KEYS = ("system",)
NAMED_MAPS = (".systems", ".per_system")


def norm(v):
    """Strings name their run (id, folder): the same string up to that."""
    if not isinstance(v, str):
        return v
    for run in (run_c, run_p):
        v = v.replace(str(run.parent), "WORKDIR").replace(run.name, "RUN")
    return re.sub(r"speed-up [0-9.]+x", "speed-up (timed)x", v)  # report flags quote a timed ratio


def compare(a, b, where):
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b) and where.endswith(NAMED_MAPS) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a.values(), b.values())):  # keyed by data names: compare in order
                compare(x, y, f"{where}[{i}]")
            return
        if set(a) != set(b):
            problems.append(f"{where}: keys differ: {sorted(set(a) ^ set(b))}")
        for k in set(a) & set(b):
            if not is_timing(k) and k not in NAME_KEYS:
                compare(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: lengths {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not (math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))):
            problems.append(f"{where}: {a!r} (containers) vs {b!r} (processes)")
    elif norm(a) != norm(b):
        problems.append(f"{where}: {a!r} vs {b!r}")


sc, sp = (json.loads((r / "summary.json").read_text()) for r in (rep_c, rep_p))
compare(sc, sp, "summary")
print(f"report: summary.json sections {sorted(sc)}; report.md {'present' if (rep_c / 'report.md').is_file() else 'MISSING'}")
if not (rep_c / "report.md").is_file():
    problems.append("the container run has no report.md")

# 4. the checkpoints load and hold the same weights
ckpts = [f"{art}/{f}" for art in sorted(set(oc) & set(op)) for f in oc[art]
         if f.endswith(".ckpt") and "checkpoints/" not in f and f in op[art]]
for rel in ckpts:
    mc, mp = load_model(run_c / rel), load_model(run_p / rel)
    sdc, sdp = mc.state_dict(), mp.state_dict()
    if sdc.keys() != sdp.keys():
        problems.append(f"{rel}: parameter names differ")
        continue
    worst = max((float((sdc[k].double() - sdp[k].double()).abs().max()) for k in sdc if sdc[k].numel()), default=0.0)
    if any(not torch.allclose(sdc[k].double(), sdp[k].double(), rtol=RTOL, atol=1e-6) for k in sdc):
        problems.append(f"{rel}: weights differ (max |diff| {worst:.3g})")
    print(f"{rel}: loads; max |weight difference| {worst:.3g}")
if not ckpts:
    problems.append("no checkpoint in the container run's outputs")

for p in problems:
    print(f"MISMATCH {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY

t_c="$(cat "${work}/containers.seconds")"; t_p="$(cat "${work}/processes.seconds")"
log "PASS: image ${image} (${size_mb} MB, build-local.sh ${t_build} s); quickstart in containers ${t_c} s, as processes ${t_p} s (side by side); check $(( $(now) - t_start )) s"
