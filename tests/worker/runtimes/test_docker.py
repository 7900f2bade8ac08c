"""`DockerRuntime` with a real engine. No registry is reachable, so the test image is an empty `docker import`
and the container gets this machine's Python and the repository through read-only bind mounts (a provider
gets the real trainer image, `worker/trainer/Dockerfile`). `.ci/run` installs and starts the engine."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.trainer.conftest import arithmetic_chat, write_job
from worker.runtimes.base import JobMount
from worker.runtimes.docker import NOBODY, DockerRuntime

ROOT = Path(__file__).resolve().parents[3]
IMAGE = "tunegrid/test-scratch:1"
MEMORY = 2 * 1024**3


@pytest.fixture(scope="module")
def docker_client():  # type: ignore[no-untyped-def]
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        if IN_CI:
            pytest.fail(f"no Docker engine ({exc.__class__.__name__}); CI=true requires it")
        pytest.skip(f"no Docker engine: {exc.__class__.__name__}")
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    client.api.import_image_from_data(empty.getvalue(), repository=IMAGE.split(":")[0], tag=IMAGE.split(":")[1])
    return client


def host_runtime(client, **kwargs) -> DockerRuntime:  # type: ignore[no-untyped-def]
    """This machine's Python and the repository, read-only, at the same paths inside the container."""
    paths = [p for p in ("/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache") if os.path.exists(p)]
    paths += [sys.base_prefix, str(ROOT)]
    volumes = {p: {"bind": p, "mode": "ro"} for p in paths}
    return DockerRuntime(image=IMAGE, client=client, memory_bytes=MEMORY, cpus=1, extra_volumes=volumes,
                         working_dir=str(ROOT), user=NOBODY, **kwargs)


def wait(running, timeout_s: float = 240) -> int:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while (code := running.poll()) is None:
        assert time.monotonic() < deadline, "the container did not finish"
        time.sleep(0.2)
    return code


PROBE = """
import socket, tempfile, time, pathlib
time.sleep(1.5)
tempfile.NamedTemporaryFile().close()  # the root filesystem is read-only; temporary files must still work
try:
    socket.create_connection(("1.1.1.1", 80), timeout=2)
    verdict = "network OPEN"
except OSError as exc:
    verdict = f"no network: {exc}"
pathlib.Path("/job/probe.txt").write_text(verdict)
"""


def test_the_container_has_no_network_and_its_limits(docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, model = tmp_path / "job", tmp_path / "model"
    job.mkdir()
    model.mkdir()
    runtime = host_runtime(docker_client, command=[sys.executable, "-c", PROBE])
    running = runtime.start(JobMount(job_dir=job, model_dir=model, gpu_index=None))
    running._container.reload()  # noqa: SLF001 - inspect while it runs
    host = running._container.attrs["HostConfig"]  # noqa: SLF001
    assert host["NetworkMode"] == "none" and host["Memory"] == MEMORY and host["PidsLimit"] == 512
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert running._container.attrs["Config"]["User"] == "65534:65534"  # noqa: SLF001
    assert running.pids()  # the host's pids of the container, for telling our GPU use from the owner's
    assert wait(running) == 0
    assert (job / "probe.txt").read_text().startswith("no network")
    assert not docker_client.containers.list(all=True, filters={"label": f"tunegrid.job_dir={job}"})  # removed


def test_the_trainer_runs_in_a_container_and_stops_with_a_checkpoint(docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from worker.trainer.tiny import build  # noqa: PLC0415

    model = build(tmp_path / "tiny")
    job = write_job(tmp_path / "job", Path("/model"), train=arithmetic_chat(200),
                    hyperparameters={"n_epochs": 50, "batch_size": 1}, checkpoint_every_steps=1000)
    runtime = host_runtime(docker_client, command=[sys.executable, "-m", "worker.trainer", "--job", "/job"])
    running = runtime.start(JobMount(job_dir=job, model_dir=model, gpu_index=None))
    progress = job / "out" / "progress.jsonl"
    deadline = time.monotonic() + 240
    while not (progress.exists() and '"type": "step"' in progress.read_text()):
        assert running.poll() is None, progress.read_text() if progress.exists() else "exited before any progress"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    began = time.monotonic()
    assert running.stop(grace_s=20) == 5  # SIGTERM: the trainer checkpoints, then exits "preempted"
    stopped_in = time.monotonic() - began
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["type"] for line in lines][-1] == "preempted"
    checkpoint = next(line for line in lines if line["type"] == "checkpoint")
    assert (job / "out" / "checkpoints" / f"step-{checkpoint['step']}" / "state.json").is_file() and stopped_in < 30
    assert "Traceback" not in job.with_name("job.log").read_text()  # the log lives outside the container's reach


PLANT = """
import os, sys
secret = sys.argv[1]
for name in ("trainer.log", "job.log", "out"):  # where an agent might write its log or read its outputs
    try:
        os.symlink(secret, os.path.join("/job", name))
    except OSError:
        pass
try:
    os.symlink(secret, "/job/../job.log")  # beside the job folder: not the container's to write
    print("planted outside")
except OSError as exc:
    print(f"cannot plant outside: {exc}")
print(oct(os.stat("/job").st_mode & 0o777), os.getuid())
"""


def test_a_container_cannot_plant_a_link_where_the_agent_writes_its_log(docker_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, model = tmp_path / "job", tmp_path / "model"
    job.mkdir()
    model.mkdir()
    (job / "train.jsonl").write_text("{}\n")
    secret = tmp_path / "owner" / ".bashrc"
    secret.parent.mkdir()
    secret.write_text("the owner's shell")
    runtime = host_runtime(docker_client, command=[sys.executable, "-c", PLANT, str(secret)])
    running = runtime.start(JobMount(job_dir=job, model_dir=model, gpu_index=None))
    assert wait(running) == 0
    log = job.with_name("job.log").read_text()
    assert "cannot plant outside" in log and "0o700 65534" in log  # the folder is the container user's alone
    assert secret.read_text() == "the owner's shell"  # the log went beside the folder, through no link
    assert not job.with_name("job.log").is_symlink()
    assert os.stat(job / "train.jsonl").st_mode & 0o777 == 0o600 and os.stat(job).st_uid == 65534
