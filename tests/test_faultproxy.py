"""bench.faultproxy: forwarding, delay, stall, reset and refuse, over raw TCP and a real gRPC server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.faultproxy import FaultProxy, parse_address

REPO_ROOT = Path(__file__).resolve().parents[1]


class EchoServer:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def connect(address: str, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(parse_address(address), timeout=timeout)


def round_trip(sock: socket.socket, payload: bytes) -> tuple[bytes, float]:
    """Send payload, read the same number of bytes back; (data, seconds)."""
    start = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - start


def assert_reset(address: str) -> None:
    """A new connection to ``address`` is reset (at connect, on send or on the first read)."""
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        with connect(address) as sock:
            sock.sendall(b"x")
            if not sock.recv(16):
                raise ConnectionResetError("closed without data")


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    for bad in ("50051", "127.0.0.1:", ":1", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    with pytest.raises(ValueError, match=">= 0"):
        FaultProxy("127.0.0.1:1", delay_ms=-1)


def test_forwards_bytes_both_ways_and_counts_them(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks
    with FaultProxy(echo.address) as proxy, connect(proxy.address) as sock:
        got, _ = round_trip(sock, payload)
        assert got == payload
        stats = proxy.stats()
        assert stats["accepted"] == 1 and stats["open"] == 1
        assert stats["bytes_up"] == stats["bytes_down"] == len(payload)


def test_delay_per_direction_changes_at_run_time(echo: EchoServer) -> None:
    with FaultProxy(echo.address, delay_ms=40) as proxy, connect(proxy.address) as sock:
        _, slow = round_trip(sock, b"x")
        assert slow >= 0.080  # 40 ms up + 40 ms down
        proxy.set_delay(0)
        _, fast = round_trip(sock, b"y")
        assert fast < 0.060
        proxy.set_delay(down_ms=100)  # up stays 0
        _, down_only = round_trip(sock, b"z")
        assert 0.100 <= down_only < 0.5


def test_delay_is_latency_not_a_bandwidth_cap(echo: EchoServer) -> None:
    with FaultProxy(echo.address, delay_ms=50) as proxy, connect(proxy.address) as sock:
        start = time.monotonic()
        for i in range(10):  # ten back-to-back messages share one round of delay, not ten
            sock.sendall(bytes([i]) * 10)
            time.sleep(0.005)
        got = b""
        while len(got) < 100:
            got += sock.recv(1024)
        assert time.monotonic() - start < 0.5
        assert proxy.stats()["bytes_down"] == 100


def test_stall_holds_bytes_until_resume(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy, connect(proxy.address, timeout=0.3) as sock:
        proxy.stall()
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(16)
        assert proxy.stats()["open"] == 1  # still connected
        proxy.resume()
        sock.settimeout(5.0)
        assert sock.recv(16) == b"held"


def test_reset_aborts_open_connections(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy, connect(proxy.address) as sock:
        assert round_trip(sock, b"ok")[0] == b"ok"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"after")
            sock.recv(16)
        stats = proxy.stats()
        assert stats["open"] == 0 and stats["resets"] == 1
        with connect(proxy.address) as again:  # new connections still work
            assert round_trip(again, b"new")[0] == b"new"


def test_refuse_resets_new_connections_until_turned_off(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        proxy.refuse(True)
        assert_reset(proxy.address)
        assert proxy.stats()["refused"] == 1
        proxy.refuse(False)
        with connect(proxy.address) as sock:
            assert round_trip(sock, b"x")[0] == b"x"


def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections are refused
        with FaultProxy(dead) as proxy:
            assert_reset(proxy.address)


@pytest.fixture
def grpc_health_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def check(address: str, timeout: float) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_grpc_through_the_proxy_delay_stall_and_reset(grpc_health_server: str) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    with FaultProxy(grpc_health_server, delay_ms=30) as proxy:
        start = time.monotonic()
        assert check(proxy.address, timeout=5) == serving
        assert time.monotonic() - start >= 0.060
        proxy.set_delay(0)
        with grpc.insecure_channel(proxy.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
            proxy.stall()
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            proxy.resume()
            proxy.reset()
            proxy.refuse(True)
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            proxy.refuse(False)


def test_cli_forwards_with_delay(echo: EchoServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.faultproxy", "--listen", f"127.0.0.1:{port}",
                             "--target", echo.address, "--delay-ms", "25"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = connect(f"127.0.0.1:{port}")
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "proxy CLI did not start"
                time.sleep(0.05)
        with sock:
            got, seconds = round_trip(sock, b"cli")
        assert got == b"cli" and seconds >= 0.050
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert f"-> {echo.address}" in out
