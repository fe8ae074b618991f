"""TLS, mutual TLS and the bearer token on both hops, against real processes on 127.0.0.1.

A CA, server and client certificates (and a rogue CA's client) are made at test time (tests/certs.py).
One cloud replica runs with mutual TLS + token; the router (``python -m router``, in the session's
Ray cluster) serves its clients with TLS + token and dials the cloud with its client certificate
and the cloud's token, so an escalated answer proves the locked-down router -> cloud link works.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.client import CloudClient
from cloud.server import ServerConfig
from edge.client import NO_RETRY, EdgeClient, RouterError
from proto import matmamba_pb2 as pb
from proto import matmamba_pb2_grpc as pb_grpc
from proto.security import ChannelSecurity, ServerSecurity, read_pem, read_token
from proto.tensors import to_tensor_msg
from router.escalation import EscalationError, EscalationSettings, ReplicaPool
from router.server import RouterConfig

from .certs import PKI, make_pki
from .test_router_integration import REPO_ROOT, VISION, Process, free_port

IMAGES = np.zeros((2, 1, 28, 28), np.uint8)
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Secured:
    pki: PKI
    cloud_token: Path
    router_token: Path
    cloud: Process
    router: Process
    tmp: Path

    def cloud_channel(self, **kw) -> ChannelSecurity:
        """mutual TLS + the cloud's token, minus what ``kw`` overrides."""
        base = dict(ca=self.pki.ca, cert=self.pki.client_cert, key=self.pki.client_key,
                    token=read_token(self.cloud_token))
        return ChannelSecurity(**{**base, **kw})

    def router_channel(self, **kw) -> ChannelSecurity:
        return ChannelSecurity(**{**dict(ca=self.pki.ca, token=read_token(self.router_token)), **kw})


def _token(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("security")
    pki = make_pki(tmp)
    cloud_token, router_token = _token(tmp / "cloud.token", "cloud-s3cret"), _token(tmp / "router.token", "r0uter")
    cloud_port, router_port = free_port(), free_port()
    cloud = Process("cloud", ["--checkpoint", str(VISION), "--port", str(cloud_port), "--metrics-port", "-1",
                              "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                              "--tls-client-ca", str(pki.ca), "--auth-token-file", str(cloud_token)],
                    cloud_port, tmp / "cloud.log").start()
    always = tmp / "always.json"  # every image escalates: each answer crosses the secured link
    always.write_text(json.dumps({"measure": "max_softmax", "threshold": 1.0, "version": "always"}))
    ray = request.getfixturevalue("ray_cluster")
    router = Process("router", ["--checkpoint", str(VISION), "--edge-level", "4", "--port", str(router_port),
                                "--metrics-port", "-1", "--ray-address", ray.address, "--thresholds", str(always),
                                "--cloud", f"127.0.0.1:{cloud_port}", "--deadline-ms", "5000",
                                "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                "--auth-token-file", str(router_token), "--cloud-ca", str(pki.ca),
                                "--cloud-cert", str(pki.client_cert), "--cloud-key", str(pki.client_key),
                                "--cloud-token-file", str(cloud_token)], router_port, tmp / "router.log").start()
    s = Secured(pki, cloud_token, router_token, cloud, router, tmp)
    try:
        for p, security in ((cloud, s.cloud_channel()), (router, s.router_channel())):
            wait_secure_serving(p, security)
        yield s
    finally:
        router.kill()
        cloud.kill()


def check(address: str, security: ChannelSecurity, timeout: float = 5.0) -> int:
    channel = security.channel(address)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
    finally:
        channel.close()


def wait_secure_serving(p: Process, security: ChannelSecurity, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert p.proc is not None and p.proc.poll() is None, p.log.read_text()
        try:
            if check(p.address, security, timeout=1.0) == SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{p.module} not SERVING over TLS in {timeout_s} s:\n{p.log.read_text()}")


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def every_rpc(channel: grpc.Channel) -> dict:
    """One call of each RPC a cloud replica serves (and an unknown one), by name."""
    stub, health = pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)
    return {"Classify": lambda: stub.Classify(pb.ClassifyRequest(images=to_tensor_msg(IMAGES)), timeout=5),
            "Score": lambda: stub.Score(pb.ScoreRequest(), timeout=5),
            "Generate": lambda: list(stub.Generate(pb.GenerateRequest(text="hi"), timeout=5)),
            "ModelInfo": lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5),
            "Health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5),
            "unknown method": lambda: channel.unary_unary("/matmamba.v1.Inference/Nope")(b"", timeout=5)}


# ------------------------------------------------------------------ the cloud's port: mutual TLS + token


def test_cloud_refuses_plaintext_server_only_tls_and_rogue_client_certificates(secured: Secured) -> None:
    address = secured.cloud.address
    refused = {"plaintext": ChannelSecurity(token=read_token(secured.cloud_token)),
               "TLS without a client certificate": secured.cloud_channel(cert=None, key=None),
               "a client certificate of another CA": secured.cloud_channel(cert=secured.pki.rogue_client_cert,
                                                                          key=secured.pki.rogue_client_key),
               "a CA that did not sign the server": secured.cloud_channel(ca=secured.pki.rogue_ca)}
    for what, security in refused.items():
        assert code_of(lambda s=security: check(address, s, timeout=3)) == grpc.StatusCode.UNAVAILABLE, what
    assert check(address, secured.cloud_channel()) == SERVING


def test_cloud_answers_unauthenticated_to_every_rpc_without_the_token(secured: Secured) -> None:
    for token in (None, "wrong", "cloud-s3cret-and-more"):
        channel = secured.cloud_channel(token=token).channel(secured.cloud.address)
        calls = every_rpc(channel)
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (token, name)
            assert "bearer token" in err.value.details()
        channel.close()
    channel = secured.cloud_channel().channel(secured.cloud.address)
    reply = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(images=to_tensor_msg(IMAGES)), timeout=30)
    assert len(reply.results) == 2
    assert code_of(lambda: channel.unary_unary("/matmamba.v1.Inference/Nope")(b"", timeout=5)) == \
        grpc.StatusCode.UNIMPLEMENTED  # with the token, an unknown method is just unknown
    channel.close()


def test_router_escalation_pool_needs_the_client_certificate_and_token(secured: Secured) -> None:
    address = secured.cloud.address

    async def escalate(security: ChannelSecurity) -> tuple[bool, str]:
        settings = EscalationSettings(deadline_s=5.0, channel=security)
        pool = ReplicaPool([address], fingerprint=fingerprint, task=pb.VISION, settings=settings)
        await pool.check_all()
        try:
            answer = await pool.unary("Classify", pb.ClassifyRequest(images=to_tensor_msg(IMAGES)))
            return True, answer.replica
        except EscalationError as err:
            return False, f"{pool.replicas[0].reason} / {err.reason}"
        finally:
            await pool.close()

    channel = secured.cloud_channel().channel(address)
    fingerprint = pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10).checkpoint_sha256
    channel.close()
    assert asyncio.run(escalate(secured.cloud_channel())) == (True, address)

    async def direct() -> int:
        async with CloudClient(address, security=secured.cloud_channel()) as cloud:
            return len((await cloud.classify(IMAGES)).served_by)

    assert asyncio.run(direct()) == 2  # cloud.client.CloudClient takes the same options
    ok, reason = asyncio.run(escalate(secured.cloud_channel(token=None)))
    assert not ok and "UNAUTHENTICATED" in reason
    ok, reason = asyncio.run(escalate(secured.cloud_channel(cert=None, key=None)))
    assert not ok and "UNAVAILABLE" in reason


# ------------------------------------------------------------------ the router's port: TLS + token


def test_router_serves_tls_clients_with_the_token_and_escalates_over_mutual_tls(secured: Secured) -> None:
    with EdgeClient(secured.router.address, security=secured.router_channel()) as client:
        answers = client.classify(IMAGES)
    assert [a.tier for a in answers] == ["cloud", "cloud"] and not any(a.degraded for a in answers)
    assert all(a.served.replica == secured.cloud.address for a in answers)
    for security in (secured.router_channel(token=None), secured.router_channel(token="nope")):
        with EdgeClient(secured.router.address, security=security, retry=NO_RETRY) as client:
            with pytest.raises(RouterError) as err:
                client.classify(IMAGES)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(RouterError) as err:
                client.reload_thresholds("/etc/passwd")  # admin RPCs too
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with EdgeClient(secured.router.address, security=ChannelSecurity(token="r0uter"), retry=NO_RETRY,
                    timeout_s=3) as client, pytest.raises(RouterError) as err:
        client.info()  # plaintext to a TLS port: no handshake
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_edge_cli_takes_the_ca_and_token_file(secured: Secured) -> None:
    base = [sys.executable, "-m", "edge", "info", "--router", secured.router.address, "--timeout", "10"]
    done = subprocess.run([*base, "--ca", str(secured.pki.ca), "--token-file", str(secured.router_token)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "task vision" in done.stdout and "cloud SERVING" in done.stdout
    done = subprocess.run([*base, "--ca", str(secured.pki.ca)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


# ------------------------------------------------------------------ configuration errors and defaults


def test_flags_that_do_not_fit_are_refused_clearly(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerSecurity(cert=pki.server_cert)
    with pytest.raises(ValueError, match="mutual TLS.*needs --tls-cert"):
        ServerSecurity(client_ca=pki.ca)
    with pytest.raises(ValueError, match="certificate and its key go together"):
        ChannelSecurity(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ValueError, match="is not PEM"):
        read_pem(_token(tmp_path / "x.pem", "hello"), "TLS certificate")
    with pytest.raises(ValueError, match="cannot read the CA file"):
        read_pem(tmp_path / "missing.pem", "CA")
    for bad in ("", "two words", "tab\there"):
        with pytest.raises(ValueError, match="one token"):
            read_token(_token(tmp_path / "t", bad))
    done = subprocess.run([sys.executable, "-m", "cloud", "--checkpoint", str(VISION), "--port", "0",
                           "--metrics-port", "-1", "--tls-cert", str(pki.server_cert)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr
    done = subprocess.run([sys.executable, "-m", "cloud", "--checkpoint", str(VISION), "--port", "0",
                           "--metrics-port", "-1", "--auth-token-file", str(tmp_path / "none")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read the token file" in done.stderr


def test_servers_bind_127_0_0_1_by_default_with_metrics_on_another_port() -> None:
    cloud, router = ServerConfig(), RouterConfig(checkpoint=VISION, edge_level=4, cloud=())
    assert cloud.host == router.host == "127.0.0.1"
    assert cloud.metrics_port != cloud.port and router.metrics_port != router.port
    assert not cloud.security.tls and not router.security.token and not router.cloud_security.tls
