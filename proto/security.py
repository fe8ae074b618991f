"""Security of every gRPC hop (client -> router, router -> cloud): TLS, mutual TLS and a bearer token.

Both are grpc's own mechanisms; docs/SECURITY.md has the threat model and the commands.

- **TLS**: the server loads its certificate chain and key from PEM files; a client verifies it
  against a CA file. **Mutual TLS**: the server also names a CA for client certificates and
  refuses a handshake without one signed by it; the client then presents its own certificate.
- **Bearer token**: a shared secret sent as ``authorization: Bearer TOKEN`` metadata on every
  call; the server compares it in constant time and answers ``UNAUTHENTICATED`` to any RPC
  (health checks included) without it. Tokens come from files (never the command line, which
  other local users can read in ``ps``). Without TLS the token crosses the network in clear:
  use it alone only on 127.0.0.1 or a private link.

    server = grpc.aio.server(interceptors=ServerSecurity(token=t).interceptors())
    ServerSecurity(cert=c, key=k, client_ca=ca).add_port(server, "127.0.0.1:50051")
    channel = ChannelSecurity(ca=ca, cert=c2, key=k2, token=t).aio_channel("127.0.0.1:50051")

This module imports grpcio only, so the edge client SDK (no torch) can use it.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
BEARER = "Bearer "
UNAUTHENTICATED_MESSAGE = ("missing or wrong bearer token: send metadata 'authorization: Bearer TOKEN' "
                           "with the token the server was started with (--auth-token-file)")


def read_pem(path: Path | str | None, what: str) -> bytes | None:
    """The bytes of a PEM file, None for None; ValueError naming the flag's role when unreadable."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the {what} file {path}: {err.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"the {what} file {path} is not PEM (no '-----BEGIN' line)")
    return data


def read_token(path: Path | str | None) -> str | None:
    """A bearer token from a file (surrounding whitespace dropped); ValueError when unreadable or empty."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the token file {path}: {err}") from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"the token file {path} must hold one token: printable, no spaces, not empty")
    if os.name == "posix" and Path(path).stat().st_mode & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


# ------------------------------------------------------------------ server side


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # an async generator, as a streaming handler must be

    kinds = {(False, False): (grpc.unary_unary_rpc_method_handler, deny),
             (False, True): (grpc.unary_stream_rpc_method_handler, deny_stream),
             (True, False): (grpc.stream_unary_rpc_method_handler, deny),
             (True, True): (grpc.stream_stream_rpc_method_handler, deny_stream)}
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    # No request deserializer: the refused request's bytes are never parsed.
    return make(behaviour, response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose ``authorization`` metadata is not ``Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._expected = (BEARER + token).encode()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return handler  # None for an unknown method: grpc answers UNIMPLEMENTED
        # Without the token even an unknown method is refused, so a caller learns nothing about the server.
        return _refusal(handler or grpc.unary_unary_rpc_method_handler(None))


@dataclass(frozen=True)
class ServerSecurity:
    """How a server listens: plaintext (default), TLS (cert + key), mutual TLS (+ client_ca); a token or none."""

    cert: Path | None = None  # PEM certificate chain of this server
    key: Path | None = None  # PEM private key of that certificate
    client_ca: Path | None = None  # PEM CA: require client certificates signed by it (mutual TLS)
    token: str | None = None  # bearer token every RPC must carry

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both for TLS, or neither")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def describe(self) -> str:
        """e.g. 'mutual TLS + token', 'TLS', 'plaintext' (for logs)."""
        mode = "mutual TLS" if self.client_ca else ("TLS" if self.tls else "plaintext")
        return f"{mode} + bearer token" if self.token else mode

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token else []

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        key, cert = read_pem(self.key, "TLS key"), read_pem(self.cert, "TLS certificate")
        ca = read_pem(self.client_ca, "client CA")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def add_port(self, server: grpc.aio.Server, target: str) -> int:
        """Bind ``target`` with these credentials; returns the port (0 when grpc could not bind)."""
        credentials = self.credentials()
        if credentials is None:
            return server.add_insecure_port(target)
        return server.add_secure_port(target, credentials)


# ------------------------------------------------------------------ client side


def _with_token(metadata: Sequence[tuple[str, str]] | None, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), (AUTH_HEADER, BEARER + token)]


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of an asyncio channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*_with_token(details.metadata, self.token)))

    async def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(d.method, d.timeout, _with_token(d.metadata, self.token), d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client dials: plaintext (default), TLS (ca), mutual TLS (+ cert, key); a token or none."""

    ca: Path | None = None  # PEM CA that signed the server's certificate; None with cert = system roots
    cert: Path | None = None  # this client's PEM certificate chain (mutual TLS)
    key: Path | None = None  # its private key
    token: str | None = None  # bearer token sent with every call
    server_name: str | None = None  # name to verify in the server's certificate (default: the host dialled)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both, or neither")

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=read_pem(self.ca, "CA"),
                                            private_key=read_pem(self.key, "client key"),
                                            certificate_chain=read_pem(self.cert, "client certificate"))

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.tls else []
        return [*options, *extra]

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to ``address`` with these credentials."""
        interceptors = [_AioToken(self.token)] if self.token else None
        if self.tls:
            return grpc.aio.secure_channel(address, self._credentials(), options=self._options(options),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to ``address`` with these credentials."""
        if self.tls:
            channel = grpc.secure_channel(address, self._credentials(), options=self._options(options))
        else:
            channel = grpc.insecure_channel(address, options=list(options))
        return grpc.intercept_channel(channel, _SyncToken(self.token)) if self.token else channel


PLAINTEXT = ChannelSecurity()  # no TLS, no token: the default of every client


# ------------------------------------------------------------------ command-line flags


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-client-ca, --auth-token-file: how a server's clients must connect."""
    group = parser.add_argument_group("security of this server's port (docs/SECURITY.md)")
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, default=None,
                       help="PEM CA: require client certificates signed by it (mutual TLS)")
    group.add_argument("--auth-token-file", type=Path, default=None,
                       help="file holding a bearer token every RPC must carry (UNAUTHENTICATED otherwise)")


def server_security_from_args(args: argparse.Namespace) -> ServerSecurity:
    """ServerSecurity from add_server_security_flags' flags (ValueError names what is wrong)."""
    return ServerSecurity(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca,
                          token=read_token(args.auth_token_file))


def add_channel_security_flags(parser: argparse.ArgumentParser, prefix: str = "", what: str = "the server") -> None:
    """--{prefix}ca, --{prefix}cert, --{prefix}key, --{prefix}token-file: how to dial ``what``."""
    group = parser.add_argument_group(f"security of the connection to {what} (docs/SECURITY.md)")
    group.add_argument(f"--{prefix}ca", type=Path, default=None,
                       help=f"PEM CA that signed {what}'s certificate: connect with TLS")
    group.add_argument(f"--{prefix}cert", type=Path, default=None,
                       help=f"PEM client certificate for mutual TLS with {what} (with --{prefix}key)")
    group.add_argument(f"--{prefix}key", type=Path, default=None, help=f"PEM private key of --{prefix}cert")
    group.add_argument(f"--{prefix}token-file", type=Path, default=None,
                       help=f"file holding the bearer token {what} expects")
    group.add_argument(f"--{prefix}tls-name", default=None,
                       help=f"name to verify in {what}'s certificate (default: the host dialled)")


def channel_security_from_args(args: argparse.Namespace, prefix: str = "") -> ChannelSecurity:
    """ChannelSecurity from add_channel_security_flags' flags with the same ``prefix``."""
    attr = prefix.replace("-", "_")
    get = lambda name: getattr(args, f"{attr}{name}")
    return ChannelSecurity(ca=get("ca"), cert=get("cert"), key=get("key"), token=read_token(get("token_file")),
                           server_name=get("tls_name"))
