"""Bad input to the command lines gives a clear message and an exit status, never a traceback.

Each case runs the CLI's ``main`` in-process and stops before any model, Ray cluster or server
would start; proto.healthcheck is also run against a real TLS + token health server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

import cloud.__main__ as cloud_cli
import edge.__main__ as edge_cli
import proto.healthcheck as healthcheck
import router.__main__ as router_cli
import router.demo as router_demo
import router.monitor as monitor
import router.tune as tune
from proto.security import ServerSecurity

from .certs import make_pki

ROOT = Path(__file__).resolve().parents[1]
VISION = str(ROOT / "checkpoints" / "matmamba-vision-fmnist")
ROUTER_BASE = ["--checkpoint", VISION, "--edge-level", "4", "--cloud", "127.0.0.1:1"]
TUNE_BASE = ["--checkpoint", VISION, "--edge-level", "4", "--data", "fashion-mnist", "--target-escalation", "0.2"]


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usage_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``, expect argparse's exit status 2, and return the message it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, says", [
    (["--port", "99999"], "--port must be in 0..65535, got 99999"),  # grpc would have bound 99999 - 65536
    (["--metrics-port", "-2"], "--metrics-port must be in -1..65535"),
    (["--cloud", "127.0.0.1:50051,127.0.0.1:99999"], "--cloud 127.0.0.1:99999: a port must be in 0..65535"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    (["--thresholds", "/nonexistent/thresholds.json"], "--thresholds /nonexistent/thresholds.json is not a file"),
    (["--thresholds", "x" * 5000], "is not a file"),  # a name too long: OSError inside is_file
    (["--checkpoint", str(ROOT / "docs")], "holds no config.json: not a checkpoint directory"),
])
def test_router_refuses_bad_flags_before_ray_starts(extra: list[str], says: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert says in usage_error(router_cli.main, ROUTER_BASE + extra, capsys)


@pytest.mark.parametrize("extra, says", [
    (["--port", "99999"], "--port must be in 0..65535, got 99999"),
    (["--metrics-port", "70000"], "--metrics-port must be in -1..65535, got 70000"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_cloud_refuses_bad_flags_before_loading(extra: list[str], says: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert says in usage_error(cloud_cli.main, ["--checkpoint", VISION, *extra], capsys)


def test_router_says_when_nothing_answers_at_the_ray_address(capsys: pytest.CaptureFixture[str]) -> None:
    message = usage_error(router_cli.main, ROUTER_BASE + ["--ray-address", f"127.0.0.1:{closed_port()}"], capsys)
    assert "nothing answers there" in message


def test_router_log_level_is_case_insensitive() -> None:
    args = router_cli.build_parser().parse_args(ROUTER_BASE + ["--log-level", "debug"])
    assert args.log_level == "DEBUG"


@pytest.mark.parametrize("argv, says", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--tokens", "-3"], "--tokens must be at least 1"),
    (["--grace", "-1"], "--grace must be >= 0"),
    (["--thresholds", "/nonexistent.json"], "does not exist"),
])
def test_demo_refuses_bad_flags_before_any_server_starts(argv: list[str], says: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert says in usage_error(router_demo.main, argv, capsys)


def test_monitor_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}/metrics"
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    bandless = tmp_path / "bandless.json"
    bandless.write_text(json.dumps({"measure": "margin", "threshold": 0.7}))
    cases = {("--metrics", "127.0.0.1:9100"): "takes a URL such as http://127.0.0.1:9100/metrics",
             ("--metrics", url, "--interval", "0"): "--interval must be a positive number",
             ("--metrics", url, "--count", "-1"): "--count must be 0",
             ("--metrics", url, "--thresholds", str(tmp_path / "missing.json")): "No such file",
             ("--metrics", url, "--thresholds", str(not_json)): "is not JSON",
             ("--metrics", url, "--thresholds", str(bandless)): "has no expected_escalation band"}
    for argv, says in cases.items():
        assert says in usage_error(monitor.main, list(argv), capsys), argv


def test_monitor_bad_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert monitor.main(["--metrics", "http://[::1/metrics", "--once"]) == 1
    assert "cannot read http://[::1/metrics" in capsys.readouterr().out


def test_tune_checks_out_and_device_before_the_models_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-dir" / "t.json"
    assert "the directory" in usage_error(tune.main, TUNE_BASE + ["--out", str(missing)], capsys)
    assert "--device" in usage_error(tune.main, TUNE_BASE + ["--out", str(tmp_path / "t.json"), "--device",
                                                             "nonsense"], capsys)
    if not torch.cuda.is_available():
        message = usage_error(tune.main, TUNE_BASE + ["--out", str(tmp_path / "t.json"), "--device", "cuda"], capsys)
        assert "sees no CUDA device" in message
    assert not (tmp_path / "t.json").exists()


def test_tune_help_names_the_from_log_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        tune.main(["--help"])
    assert "--from-log DIR --help" in capsys.readouterr().out


def test_edge_cli_names_a_missing_image_before_calling_the_router(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "shoe.png"
    assert edge_cli.main(["classify", str(missing), "--router", f"127.0.0.1:{closed_port()}", "--timeout", "5"]) == 1
    assert f"{missing} does not exist" in caplog.text
    assert "UNAVAILABLE" not in caplog.text


@pytest.mark.parametrize("argv, says", [
    (["info", "--timeout", "0"], "--timeout must be a positive number"),
    (["info", "--router", "127.0.0.1:99999"], "a port must be in 0..65535"),
    (["classify", "x.png", "--concurrency", "0"], "--concurrency must be at least 1"),
])
def test_edge_cli_refuses_bad_numbers(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert says in usage_error(edge_cli.main, argv, capsys)


# ------------------------------------------------------------------ proto.healthcheck


@contextmanager
def health_server(security: ServerSecurity) -> Iterator[str]:
    """A grpc.aio server on 127.0.0.1 with only the health service (SERVING), in a thread of its own."""
    loop = asyncio.new_event_loop()
    started: dict[str, object] = {}
    ready = threading.Event()

    async def start() -> None:
        server = grpc.aio.server(interceptors=security.interceptors())
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        started["port"] = security.add_port(server, "127.0.0.1:0")
        await server.start()
        started["server"] = server
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    ready.wait(10)
    try:
        yield f"127.0.0.1:{started['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(started["server"].stop(None), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_healthcheck_dials_tls_with_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = make_pki(tmp_path)
    token = tmp_path / "server.token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    with health_server(ServerSecurity(cert=pki.server_cert, key=pki.server_key, token="s3cret-token")) as address:
        secured = [address, "--ca", str(pki.ca), "--token-file", str(token), "--timeout", "10"]
        assert healthcheck.main(secured) == healthcheck.SERVING
        assert f"{address} (server): SERVING" in capsys.readouterr().out
        assert healthcheck.main([address, "--ca", str(pki.ca), "--timeout", "10"]) == healthcheck.NO_ANSWER
        assert "UNAUTHENTICATED" in capsys.readouterr().out
        assert healthcheck.main([address, "--timeout", "2"]) == healthcheck.NO_ANSWER  # plaintext on a TLS port


@pytest.mark.parametrize("argv, says", [
    (["127.0.0.1:99999"], "HOST:PORT with a port in 0..65535"),
    (["no-port-here"], "HOST:PORT"),
    (["127.0.0.1:1", "--timeout", "-1"], "--timeout must be a positive number"),
    (["127.0.0.1:1", "--ca", "/nonexistent/ca.crt"], "cannot read the CA file"),
])
def test_healthcheck_refuses_bad_arguments(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert says in usage_error(healthcheck.main, argv, capsys)


def test_monitor_pointed_at_a_grpc_port_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with health_server(ServerSecurity()) as address:
        assert monitor.main(["--metrics", f"http://{address}/metrics", "--once"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "the answer is not HTTP" in out and "--metrics-port" in out
