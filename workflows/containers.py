"""`lamflow submit --debug --container docker`: debug mode with every step in the lamflow step image.

The run is still dflow's debug mode: the same step folders under `<workdir>/<run id>/`, the same
records, and `lamflow status/logs/retry/download` work as for a process-mode run. What changes
is how each step runs: dflow's own `ContainerExecutor` (given to the Workflow as its `context`)
rewrites every step script into `docker run -v$(pwd)/tmp:/tmp -v$(pwd)/script:/script IMAGE
python3 /script`. Its inputs are hard-linked into the step's `tmp/`, and its outputs are written
there, which is where the process-mode run writes them. This module only sets up that
executor:

- one image for every step (`--container-image`, `LAMFLOW_CONTAINER_IMAGE`, default the tag
  `deploy/images/build-local.sh` gives), `python3` as the command (process mode runs the host's
  interpreter), and no pulls (a run must not reach a registry);
- on the `docker run` line dflow writes: `--rm`, `--network none` (no network in any step),
  the user (the image's own non-root user; the caller's uid when lamflow itself is not root,
  so that files stay the caller's), and the thread settings of the run (`-e OMP_NUM_THREADS ...`;
  torch's own threads are each OP's `threads` parameter);
- the training stages' resume folder (`<workdir>/.lamflow/<group>/resume`) as a host mount at the
  same path, through dflow's own host-path mounts, so a retried step resumes from its checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from copy import deepcopy
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from dflow.executor import ContainerExecutor
from dflow.op_template import ScriptOPTemplate

from lamflow.model.errors import LamflowError

ENGINES = ("docker",)
# passed by name (`-e NAME`): docker copies each one's value from the environment it runs in
# (the step's, which is lamflow's), and sets nothing for a name that is not set there
PASSED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND", "LAMFLOW_FAIL_STAGE")
RESUME_VOLUME = "lamflow-resume"


class ContainerError(LamflowError):
    """Containers cannot run the pipeline: `no image lamflow:0.1.0-local-cpu (build it with ...)`."""


def default_image() -> str:
    """The tag `deploy/images/build-local.sh` gives the CPU image: lamflow:<version>-local-cpu."""
    env = os.environ.get("LAMFLOW_CONTAINER_IMAGE")
    if env:
        return env
    try:
        version = metadata.version("lamflow")
    except metadata.PackageNotFoundError:
        version = "0.1.0"
    return f"lamflow:{version}-local-cpu"


@dataclass(frozen=True)
class Container:
    """How the steps of a debug run are containerized; stored in the run's record, so that
    `lamflow retry` runs the rerun steps in the same image."""

    engine: str = "docker"
    image: str = ""

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ContainerError(f"--container {self.engine}: not supported (one of: {', '.join(ENGINES)})")
        if not self.image:
            object.__setattr__(self, "image", default_image())

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, d: dict | None) -> "Container | None":
        return cls(**d) if d else None


def check_ready(c: Container) -> None:
    """Fail before any work when the engine's CLI or daemon is missing, or the image is not there."""
    exe = shutil.which(c.engine)
    if exe is None:
        raise ContainerError(f"--container {c.engine}: no `{c.engine}` command on PATH")
    try:
        r = subprocess.run([exe, "image", "inspect", "--format", "{{.Id}}", c.image], capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired as e:
        raise ContainerError(f"--container {c.engine}: `{c.engine} image inspect` did not answer in 60 s") from e
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [""])[-1]
        if "daemon" in err.lower() or "connect" in err.lower():
            raise ContainerError(f"--container {c.engine}: the {c.engine} daemon does not answer ({err})")
        raise ContainerError(f"--container {c.engine}: no image {c.image} here (build it with "
                             f"deploy/images/build-local.sh, or set --container-image / LAMFLOW_CONTAINER_IMAGE)")


def check_same_filesystem(workdir: Path, inputs: list[Path]) -> None:
    """dflow's ContainerExecutor hard-links each step's inputs into the step folder (a container
    cannot follow symlinks out of its mounts): every input file must be on the workdir's
    filesystem."""
    dev = workdir.stat().st_dev
    for root in inputs:
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for name in files:
                f = Path(dirpath) / name
                if f.resolve().stat().st_dev != dev:
                    raise ContainerError(f"{f.resolve()}: on another filesystem than the workdir {workdir}; containerized "
                                         "steps hard-link their inputs, so put --workdir on the data's filesystem")


def run_flags(engine: str = "docker", uid: int | None = None, gid: int | None = None) -> list[str]:
    """The flags lamflow adds to dflow's `docker run`."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    flags = ["--rm", "--network", "none"]
    if uid != 0:  # lamflow runs as a user: run the step as that user, so the outputs stay theirs
        flags += ["--user", f"{uid}:{gid}"]
    for name in PASSED_ENV:
        flags += ["-e", name]
    return flags


class StepContainer(ContainerExecutor):
    """dflow's ContainerExecutor with lamflow's image, command, run flags and resume mount.
    (Module level: dflow pickles it into the worker processes of sliced steps.)"""

    def __init__(self, container: Container, resume_root: str | None = None, uid: int | None = None,
                 gid: int | None = None):
        super().__init__(image_pull_policy="Never", **{container.engine: container.engine})  # Never: no pull
        self.container = container
        self.resume_root = resume_root
        self.flags = run_flags(container.engine, uid, gid)
        self.as_root = (os.getuid() if uid is None else uid) == 0

    def render(self, template):
        if not isinstance(template, ScriptOPTemplate):
            return template
        t = deepcopy(template)
        t.image = self.container.image
        t.command = ["python3"]  # the image's venv python (process mode runs the host's)
        if self.resume_root and "resume_dir" in t.inputs.parameters:
            # dicts: dflow reads mounts as mount["name"] / volume["hostPath"]["path"]
            t.volumes = list(t.volumes) + [{"name": RESUME_VOLUME, "hostPath": {"path": self.resume_root}}]
            t.mounts = list(t.mounts) + [{"name": RESUME_VOLUME, "mountPath": self.resume_root}]
        # dflow 1.8.134's ContainerExecutor reads `value_from_path` of every output parameter and
        # fails on one that has a value instead (its own init-artifact steps of sliced stages):
        # such parameters need no mount, so they are set aside while it renders
        valued = {k: v for k, v in t.outputs.parameters.items() if getattr(v, "value_from_path", None) is None}
        for k in valued:
            del t.outputs.parameters[k]
        out = super().render(t)
        for k, v in valued.items():
            out.outputs.parameters[k] = v
        docker = self.container.engine
        anchor = f"mkdir -p tmp && {docker} run -v$(pwd)/tmp:/tmp "
        if out.script.count(anchor) != 1:
            raise ContainerError(f"dflow's container script has changed (no single `{anchor.strip()}`): "
                                 "lamflow cannot add --network none to it")
        # lamflow is root, the step the image's user (uid 1000): that user must write the step's tmp/
        # (outputs) and enter its input folders (dflow's staging makes some 0700). Folders only: the
        # files are hard links to the inputs, whose modes stay as they are.
        prep = ("mkdir -p tmp && chmod a+rwx tmp && find tmp -mindepth 1 -type d -exec chmod a+rx {} + && "
                if self.as_root else "mkdir -p tmp && ")
        out.script = out.script.replace(anchor, f"{prep}{docker} run {' '.join(self.flags)} -v$(pwd)/tmp:/tmp ")
        # An optional input artifact that is absent (no clean stage, say) is a dangling symlink in
        # tmp/; dflow's step that turns the input symlinks into hard links stops at the first such
        # link and leaves the rest unlinked. Removed first: absent stays absent to the op.
        out.script = "find tmp -xtype l -delete\n" + out.script
        return out


def executor(container: Container, resume_root: str | os.PathLike | None = None, uid: int | None = None,
             gid: int | None = None):
    """dflow's ContainerExecutor for the run (the Workflow's `context`: every step goes through it).
    The resume folder is created here, writable by the container's user."""
    if resume_root is not None:
        resume_root = str(Path(resume_root).resolve())
        Path(resume_root).mkdir(parents=True, exist_ok=True)
        if (os.getuid() if uid is None else uid) == 0:
            os.chmod(resume_root, 0o777)
    return StepContainer(container, resume_root, uid, gid)


def for_run(container: Container | None, parent: dict | None = None) -> Container | None:
    """The containers of a debug run: the given ones, else (a retry) its parent run's; checked
    ready (engine, daemon, image) before the run stages anything."""
    if container is None and parent is not None:
        container = Container.from_record(parent.get("container"))
    if container is not None:
        check_ready(container)
    return container


def workflow_context(container: Container | None, workdir: Path, inputs: dict, resume_root: str | None) -> dict:
    """Keyword arguments for the debug run's Workflow: {} without containers, else its
    `context` (after checking that the input files can be hard-linked into the step folders)."""
    if container is None:
        return {}
    check_same_filesystem(workdir, [Path(p) for p in inputs.values() if p])
    return {"context": executor(container, resume_root)}
