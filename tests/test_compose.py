"""docker-compose.yml without a Docker engine: it validates, and its services' commands really serve.

1. ``docker-compose config`` (Debian's ``docker-compose`` package; `.ci/run` installs it) accepts the
   file, alone and with the GPU-router override, and resolves the same commands as our own
   reading of it below. In CI (``CI`` set) a missing binary fails; elsewhere those tests skip.
2. Every project service (cloud, router; the ``client`` profile once ``python -m edge demo``
   exists) runs as a local process with the compose file's own command, environment and
   health check: ``${VAR:-default}`` filled with defaults, container paths mapped to their bind
   sources (``/checkpoints`` -> ``./checkpoints``), named volumes to temp dirs, ``0.0.0.0`` and
   service names to 127.0.0.1, container ports to free local ports. Each must become healthy
   (gRPC health SERVING, its compose health check passing, /metrics answering), the router must
   reach the cloud through the compose file's ``--cloud dns:///cloud:50051``, and SIGTERM must
   stop each with exit status 0, as ``docker-compose stop`` would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.server import CLOUD_HEALTH_SERVICE

from .test_router_integration import SERVING, free_port, health, wait_until

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "deploy" / "compose.router-gpu.yml"
# The services built from this repository (prometheus and grafana are upstream images).
PROJECT_SERVICES = ("cloud", "router")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 45.0
# Images the client runs over in this test (the compose default is the whole shipped sample).
CLIENT_LIMIT = "64"
VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


# ------------------------------------------------------------------ reading the compose file as compose does


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, and $$ for a $."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        spec = match.group("braced") or match.group("plain")
        for sep, unset_or_empty in ((":-", True), ("-", False)):
            if sep in spec:
                name, default = spec.split(sep, 1)
                if name not in env or (unset_or_empty and env[name] == ""):
                    return default
                return env[name]
        return env.get(spec, "")

    return VARIABLE.sub(value, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """Substitute in every string value of parsed YAML (compose interpolates values after parsing)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate_tree(yaml.safe_load(COMPOSE.read_text()), env)["services"]


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed; .ci/run installs Debian's docker-compose package")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); CI installs it and runs this")
    return binary


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker-compose config`` of ``files`` with exactly ``env`` set (no .env file, no variable of the caller's)."""
    used = set(re.findall(r"\$\{(\w+)", "".join(f.read_text() for f in files)))
    clean = {k: v for k, v in os.environ.items() if k not in used}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as env_file:
        args = [compose_binary(), "--project-directory", str(ROOT), "--env-file", env_file.name]
        for file in files:
            args += ["-f", str(file)]
        run = subprocess.run([*args, "--profile", "client", "config"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**clean, **(env or {})})
    assert run.returncode == 0, f"docker-compose config refused the file:\n{run.stderr}"
    return yaml.safe_load(run.stdout)


def test_compose_config_validates() -> None:
    config = compose_config(COMPOSE)
    assert set(config["services"]) == {"cloud", "router", "prometheus", "grafana", "client"}
    assert config["services"]["client"]["profiles"] == ["client"]
    cloud = config["services"]["cloud"]
    assert "ports" not in cloud and "container_name" not in cloud  # --scale cloud=N needs both absent
    assert cloud["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_config_validates_with_the_gpu_router_override() -> None:
    router = compose_config(COMPOSE, GPU_OVERRIDE)["services"]["router"]
    assert router["build"]["dockerfile"] == "deploy/cloud.Dockerfile"
    assert router["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_our_reading_of_the_file_matches_docker_compose() -> None:
    """The local-process test below reads the file itself: it must read what docker-compose reads."""
    env = {"CHECKPOINT": "matmamba-lm-austen", "EDGE_LEVEL": "2", "THRESHOLDS": "/thresholds/t.json"}
    theirs = compose_config(COMPOSE, env=env)["services"]
    ours = load_compose(env)
    for name in ("cloud", "router", "client"):
        assert [str(a) for a in ours[name]["command"]] == [str(a) for a in theirs[name]["command"]], name
    assert "/checkpoints/matmamba-lm-austen" in ours["router"]["command"]


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET} $SET $$SET ${UNSET}", env) == \
        "x d  d x x $SET "


# ------------------------------------------------------------------ the services as local processes


class LocalService:
    """One compose service's command as a local process, with container names mapped to this machine."""

    def __init__(self, name: str, spec: dict[str, Any], ports: dict[str, dict[int, int]], tmp: Path) -> None:
        self.name, self.spec, self.ports = name, spec, ports
        self.paths = self._volumes(spec.get("volumes", []), tmp)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _volumes(volumes: list[Any], tmp: Path) -> dict[str, Path]:
        """{container path: local path}: bind sources relative to the repo, named volumes as temp dirs."""
        paths = {}
        for volume in volumes:
            if isinstance(volume, str):
                source, target = volume.split(":")[:2]
            else:
                source, target = volume["source"], volume["target"]
            if source.startswith(("./", "/")):
                paths[target] = (ROOT / source).resolve()
            else:
                paths[target] = tmp / "volumes" / source
                paths[target].mkdir(parents=True, exist_ok=True)
        return paths

    def map(self, value: Any) -> str:
        """A command argument or environment value as it must read outside the container."""
        text = str(value)
        if text == "python":
            return sys.executable
        if text == "0.0.0.0":
            return "127.0.0.1"
        for target, local in self.paths.items():
            if text == target or text.startswith(target + "/"):
                return str(local) + text[len(target):]
        own = self.ports[self.name]
        if text.isdigit() and int(text) in own:
            return str(own[int(text)])
        match = re.fullmatch(r"(dns:///)?([\w.-]+):(\d+)", text)
        if match:
            scheme, host, port = match.groups()
            service = self.name if host in ("127.0.0.1", "localhost") else host
            if service in self.ports and int(port) in self.ports[service]:
                return f"{scheme or ''}127.0.0.1:{self.ports[service][int(port)]}"
        return text

    @property
    def command(self) -> list[str]:
        return [self.map(a) for a in self.spec["command"]]

    @property
    def healthcheck(self) -> list[str]:
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", f"{self.name}: health check must be an exec form ['CMD', ...]"
        return [self.map(a) for a in test[1:]]

    def port(self, container_port: int) -> int:
        return self.ports[self.name][container_port]

    def start(self) -> LocalService:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update({k: self.map(v) for k, v in (self.spec.get("environment") or {}).items()})
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        return True

    def stop(self) -> int:
        """SIGTERM (as docker-compose stop sends), then the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def container_ports(spec: dict[str, Any]) -> set[int]:
    """Ports a service listens on inside its container (``expose`` and the container side of ``ports``)."""
    ports = {int(p) for p in spec.get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[-1]) for p in spec.get("ports", [])}
    return ports


def metrics_answer(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.status == 200 and b"# TYPE" in reply.read()
    except OSError:
        return False


def demo_client_exists() -> bool:
    from edge.__main__ import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return "demo" in subparsers.choices


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalService]]:
    """cloud and router started at once from the compose file (the router retries the cloud each round)."""
    tmp = tmp_path_factory.mktemp("compose")
    env = {"CLIENT_LIMIT": CLIENT_LIMIT, "CLIENT_OUT_DIR": str(tmp / "out")}
    (tmp / "out").mkdir()
    specs = load_compose(env)
    ports = {name: {p: free_port() for p in container_ports(spec)} for name, spec in specs.items()}
    started = {name: LocalService(name, specs[name], ports, tmp).start() for name in PROJECT_SERVICES}
    started["client"] = LocalService("client", specs["client"], ports, tmp)
    try:
        yield started
    finally:
        for service in started.values():
            if service.proc is not None and service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait(10)


@pytest.mark.slow
def test_every_compose_service_becomes_healthy(services: dict[str, LocalService]) -> None:
    cloud, router = services["cloud"], services["router"]
    assert "--cloud" in router.command and router.command[router.command.index("--cloud") + 1].startswith("dns:///")
    for service, port in ((cloud, 50051), (router, 50052)):
        address = f"127.0.0.1:{service.port(port)}"
        wait_until(lambda s=service, a=address: s.running() and health(a) == SERVING, START_TIMEOUT_S,
                   f"{service.name} health SERVING on {address}", poll_s=0.5)
    for service, port in ((cloud, 9101), (router, 9100)):
        assert metrics_answer(service.port(port)), f"{service.name} /metrics does not answer"
        check = subprocess.run(service.healthcheck, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{service.name} compose health check failed: {check.stdout}{check.stderr}"
    router_address = f"127.0.0.1:{router.port(50052)}"
    wait_until(lambda: router.running() and health(router_address, CLOUD_HEALTH_SERVICE) == SERVING, 30.0,
               "the router to reach the cloud through the compose --cloud address", poll_s=0.5)


@pytest.mark.slow
def test_the_client_profile_runs_the_demo_client(services: dict[str, LocalService]) -> None:
    if not demo_client_exists():
        pytest.skip("the compose client service runs `python -m edge demo`, which this branch does not have yet")
    client, router = services["client"], services["router"]
    address = f"127.0.0.1:{router.port(50052)}"
    wait_until(lambda: router.running() and health(address, CLOUD_HEALTH_SERVICE) == SERVING, START_TIMEOUT_S,
               "the router (and its cloud) for the client", poll_s=0.5)
    client.start()
    assert client.proc is not None
    assert client.proc.wait(START_TIMEOUT_S) == 0, f"the client failed:\n{client.log.read_text()[-4000:]}"


@pytest.mark.slow
def test_sigterm_stops_every_service_with_exit_status_zero(services: dict[str, LocalService]) -> None:
    for name in ("router", "cloud"):
        service = services[name]
        assert service.running()
        assert service.stop() == 0, f"{name} did not exit 0 on SIGTERM:\n{service.log.read_text()[-4000:]}"


# ------------------------------------------------------------------ the Dockerfiles (read, not built: no engine here)


def dockerfiles() -> list[Path]:
    files = {ROOT / spec["build"]["dockerfile"] for spec in load_compose({}).values() if "build" in spec}
    files.add(ROOT / yaml.safe_load(GPU_OVERRIDE.read_text())["services"]["router"]["build"]["dockerfile"])
    return sorted(files)


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_the_dockerfiles_copy_what_exists_and_pin_what_make_setup_pins(dockerfile: Path) -> None:
    assert dockerfile.is_file()
    text = dockerfile.read_text()
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert source not in ignored, f"{dockerfile.name} copies {source}, which .dockerignore leaves out"
    makefile = (ROOT / "Makefile").read_text()
    for package in re.findall(r"(?:torch|mamba-ssm|causal-conv1d)==[\w.]+", makefile):
        name, version = package.split("==")
        if f"{name}==" in text:
            assert re.search(rf"{name}==(\$\{{TORCH_VERSION\}}|{re.escape(version)})", text), package
            if name == "torch":
                assert f"TORCH_VERSION={version}" in text
    assert "pip install -e ." in text and "python -m proto.codegen" in text
