"""`lamflow submit --debug --container docker` at unit level (no Docker needed): the executor is
dflow's ContainerExecutor, and the `docker run` line it writes for a step has no network, the
step image, the image's python3, the step's tmp/ and the resume folder mounted, and no pull.
The real run in containers is .ci/container-check.sh."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import yaml
from conftest import data_path

from lamflow import ops
from lamflow.workflows import containers
from lamflow.workflows.cli import main
from lamflow.workflows.containers import Container, ContainerError
from lamflow.workflows.dag import BuildOptions, template
from lamflow.workflows.spec import Resources


def docker_line(script: str) -> str:
    lines = [ln for ln in script.splitlines() if " run " in ln and "docker" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def pretrain_template():
    return template(ops.Pretrain, Resources(cpu=2, memory="4Gi"), BuildOptions(python="/host/bin/python"))


def test_steps_run_through_dflows_container_executor_with_no_network(tmp_path):
    from dflow.executor import ContainerExecutor

    resume = tmp_path / "resume"
    ex = containers.executor(Container("docker", "lamflow:test-cpu"), resume, uid=0, gid=0)
    assert isinstance(ex, ContainerExecutor)
    assert resume.is_dir() and stat.S_IMODE(resume.stat().st_mode) == 0o777  # writable by the image's user
    t = pretrain_template()
    out = ex.render(t)
    assert out.command == ["sh"] and out.image == "lamflow:test-cpu"
    line = docker_line(out.script)
    flags = line.split(" run ", 1)[1].split()
    assert line.startswith("mkdir -p tmp && chmod a+rwx tmp && find tmp -mindepth 1 -type d -exec chmod a+rx {} + "
                           "&& docker run ")
    assert flags[:3] == ["--rm", "--network", "none"]
    assert "--user" not in flags  # lamflow is root: the image's own non-root user
    assert "-v$(pwd)/tmp:/tmp" in flags and "-v$(pwd)/script:/script" in flags
    assert f"-v{resume}:{resume}" in flags  # the training stage's resume folder, at the same path
    assert ["--cpus", "2"] == flags[flags.index("--cpus"):flags.index("--cpus") + 2]
    assert flags[-3:] == ["lamflow:test-cpu", "python3", "/script"]  # the image's python, not the host's
    assert "-e OMP_NUM_THREADS" in line
    assert "LAMFLOW_THREADS" not in line  # torch threads are an OP parameter, not the environment
    assert "docker pull" not in out.script and "docker images" not in out.script  # no registry is asked
    assert t.command == ["/host/bin/python"] and t.mounts == []  # the step's own template is untouched


def test_dflows_valued_output_parameters_and_absent_optional_inputs_are_handled(tmp_path):
    from dflow import OutputParameter

    t = pretrain_template()
    t.outputs.parameters["dflow_artifact_key"] = OutputParameter(value="{{workflow.name}}/x")  # as in init-artifact
    out = containers.executor(Container("docker", "img:1"), None, uid=0, gid=0).render(t)
    assert out.outputs.parameters["dflow_artifact_key"].value == "{{workflow.name}}/x"
    # dangling links (absent optional inputs) go before dflow turns the input links into hard links
    assert out.script.startswith("find tmp -xtype l -delete\n")
    assert out.script.index("find tmp -xtype l") < out.script.index("os.link(src, f)")


def test_a_non_root_caller_runs_the_steps_as_itself_and_stages_without_resume_get_no_mount(tmp_path):
    ex = containers.executor(Container("docker", "img:1"), tmp_path / "resume", uid=1234, gid=99)
    out = ex.render(template(ops.Report, Resources(), BuildOptions()))
    line = docker_line(out.script)
    assert "--user 1234:99" in line and "chmod" not in line
    assert str(tmp_path / "resume") not in line  # only pretrain/finetune have a resume folder


def test_the_executor_survives_pickling_into_dflows_worker_processes(tmp_path):
    ex = containers.executor(Container("docker", "img:1"), tmp_path / "r", uid=0, gid=0)
    back = pickle.loads(pickle.dumps(ex))
    assert docker_line(back.render(pretrain_template()).script) == docker_line(ex.render(pretrain_template()).script)


def fake_docker(tmp_path: Path, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "docker"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)


def test_a_missing_engine_daemon_or_image_is_one_clear_error(tmp_path, monkeypatch):
    c = Container("docker", "lamflow:0.0-local-cpu")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ContainerError, match="no `docker` command on PATH"):
        containers.check_ready(c)
    fake_docker(tmp_path, 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1')
    with pytest.raises(ContainerError, match="daemon does not answer"):
        containers.check_ready(c)
    fake_docker(tmp_path, 'echo "Error: No such image: $5" >&2; exit 1')
    with pytest.raises(ContainerError, match="no image lamflow:0.0-local-cpu here .*build-local.sh"):
        containers.check_ready(c)
    fake_docker(tmp_path, '[ "$5" = lamflow:0.0-local-cpu ] && echo sha256:abc')
    containers.check_ready(c)
    with pytest.raises(ContainerError, match="--container podman: not supported"):
        Container("podman", "x")


def test_a_retry_runs_in_its_parents_image(monkeypatch):
    monkeypatch.setattr(containers, "check_ready", lambda c: None)
    parent = {"id": "x", "container": Container("docker", "lamflow:9-local-cpu").record()}
    assert containers.for_run(None, parent) == Container("docker", "lamflow:9-local-cpu")
    assert containers.for_run(None, {"id": "y"}) is None
    monkeypatch.setenv("LAMFLOW_CONTAINER_IMAGE", "mine:2")
    assert Container("docker").image == "mine:2"


def test_inputs_on_another_filesystem_are_refused_before_the_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.npy").write_bytes(b"x")
    containers.check_same_filesystem(tmp_path, [data])
    if os.stat("/proc/version").st_dev != tmp_path.stat().st_dev:
        (data / "elsewhere").symlink_to("/proc/version")
        with pytest.raises(ContainerError, match="another filesystem"):
            containers.check_same_filesystem(tmp_path, [data])


def test_submit_container_flags_need_debug(tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    pipe.write_text(yaml.safe_dump({"name": "c", "datasets": {"ch4": ch4}, "stages": {"test": {"systems": ["ch4"]}}}))
    assert main(["submit", str(pipe), "--container", "docker"]) == 1
    assert "needs --debug" in capsys.readouterr().err
    assert main(["submit", str(pipe), "--debug", "--container-image", "x:1"]) == 1
    assert "--container-image needs --container docker" in capsys.readouterr().err


def test_the_container_check_is_off_with_its_switch_and_build_local_refuses_bad_arguments():
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LAMFLOW_CONTAINER_CHECK": "0"}
    r = subprocess.run(["bash", str(repo / ".ci" / "container-check.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "off (LAMFLOW_CONTAINER_CHECK=0)" in r.stderr
    r = subprocess.run(["bash", "-n", str(repo / "deploy" / "images" / "build-local.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(repo / "deploy" / "images" / "build-local.sh"), "--flavor", "rocm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--flavor cpu or cuda" in r.stderr
