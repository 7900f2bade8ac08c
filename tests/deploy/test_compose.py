"""docker-compose.yml is valid (the compose tool itself parses and resolves it), runs the whole production
shape with health checks and volumes, reserves an NVIDIA GPU for the provider agent, and the coordinator image
builds from the Dockerfile when its base image can be had (no registry is reachable here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"postgres", "redis", "seaweedfs", "migrate", "api", "celery-worker", "celery-beat", "worker", "prometheus"}


def compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            return command
    return None


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The compose file with the documented .env made from .env.example (as a user would)."""
    for name in ("docker-compose.yml", "Dockerfile", ".env.example", "deploy/prometheus.yml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    env = (ROOT / ".env.example").read_text().replace("POSTGRES_PASSWORD=change-me-to-a-long-random-string",
                                                      "POSTGRES_PASSWORD=s3cret")
    (tmp_path / ".env").write_text(env)
    return tmp_path


def test_the_compose_file_validates_and_holds_the_whole_stack(project: Path) -> None:
    command = compose_command()
    if command is None:
        if IN_CI:
            pytest.fail("CI=true needs docker compose (.ci/run installs docker-compose)")
        pytest.skip("no docker compose here")
    done = subprocess.run([*command, "--profile", "provider", "--profile", "monitoring", "config"], cwd=project, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if name != "migrate":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["api"]["environment"]["TUNEGRID_DATABASE_URL"] == "postgresql://tunegrid:s3cret@postgres:5432/tunegrid"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "--workers" in services["api"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any("/var/run/docker.sock" in str(v) for v in services["worker"]["volumes"])
    assert {"postgres-data", "coordinator-data", "worker-data", "prometheus-data"} <= set(config["volumes"])
    assert services["api"]["environment"]["PROMETHEUS_MULTIPROC_DIR"] in " ".join(services["api"]["tmpfs"])
    assert services["api"]["environment"]["TUNEGRID_REDIS_URL"] == "redis://redis:6379/0"  # the anchor still merged
    assert "TUNEGRID_METRICS_TOKEN" in services["prometheus"]["command"][0]
    assert services["celery-worker"]["environment"]["TUNEGRID_CELERY_METRICS_PORT"] == "9100"
    assert "ports" not in services["celery-worker"]  # its metrics stay on the stack's network
    for name in ("api", "celery-worker", "celery-beat", "migrate"):  # every coordinator process shares the store
        assert services[name]["environment"]["TUNEGRID_STORAGE_URL"] == "s3://tunegrid", name
        assert services[name]["environment"]["TUNEGRID_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert services["api"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "TUNEGRID_S3_SECRET_ACCESS_KEY" in services["seaweedfs"]["command"][0]  # signatures checked
    assert "seaweedfs-data" in config["volumes"]
    (project / ".env").write_text("")
    missing = subprocess.run([*command, "config", "-q"], cwd=project, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # a missing secret is refused


def test_the_coordinator_image_builds_where_its_base_can_be_had(tmp_path: Path) -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine")
    if subprocess.run(["docker", "image", "inspect", "python:3.11-slim"], capture_output=True).returncode != 0:
        pytest.skip("the base image python:3.11-slim is not here and no registry is reachable to pull it")
    done = subprocess.run(["docker", "build", "-t", "tunegrid/coordinator:test", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = subprocess.run(["docker", "run", "--rm", "tunegrid/coordinator:test", "tunegrid-coordinator", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "serve" in ran.stdout
