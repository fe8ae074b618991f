"""A fault-injecting TCP proxy on 127.0.0.1: added delay, stalls and connection resets, changeable mid-run.

    python -m bench.faultproxy --listen 127.0.0.1:50061 --target 127.0.0.1:50051 --delay-ms 20

forwards every connection made to ``--listen`` to ``--target`` and holds each chunk of bytes
``--delay-ms`` in each direction, so a request/reply round trip gains 2 x 20 ms (use
``--up-delay-ms`` / ``--down-delay-ms`` for one direction only). Delay is latency, not a
bandwidth cap: chunks read back to back leave back to back, each ``delay`` after it arrived.

From Python (tests, benchmarks), the proxy runs on its own event loop thread and every control
method may be called from any thread while traffic flows::

    from bench.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1:50051", delay_ms=10) as proxy:   # listens on a free port
        channel = grpc.insecure_channel(proxy.address)           # "127.0.0.1:PORT"
        proxy.set_delay(up_ms=0, down_ms=50)   # replies 50 ms late from now on
        proxy.stall()                          # hold every byte (connections stay open) ...
        proxy.resume()                         # ... and release what was held, in order
        proxy.reset()                          # RST every open connection now
        proxy.refuse(True)                     # RST each new connection as soon as it is accepted
        proxy.stats()                          # {"accepted": ..., "open": ..., "bytes_up": ..., ...}

"up" is client -> target, "down" is target -> client. Inside an asyncio program use
``await proxy.start_async()`` / ``await proxy.stop_async()`` on the running loop instead of
``start()`` / ``stop()``; the control methods are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("bench.faultproxy")

CHUNK_BYTES = 64 * 1024  # largest read per chunk; each chunk is delayed as one unit
START_TIMEOUT_S = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError with the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


@dataclass(eq=False)  # hashed by identity: links live in a set
class _Link:
    """One proxied connection: the client side, the target side and their pump tasks."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task] = field(default_factory=list)
    ended: int = 0  # directions whose sender reached end of stream


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close a socket so the peer sees a reset (SO_LINGER 0), not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Forwards TCP connections from ``listen`` (default: a free port on 127.0.0.1) to ``target``.

    ``delay_ms`` sets both directions; ``up_delay_ms`` / ``down_delay_ms`` override one.
    """

    def __init__(self, target: str, *, listen: str = "127.0.0.1:0", delay_ms: float = 0.0,
                 up_delay_ms: float | None = None, down_delay_ms: float | None = None) -> None:
        self.target = parse_address(target)
        self.listen = parse_address(listen)
        self._delay = {"up": (delay_ms if up_delay_ms is None else up_delay_ms) / 1e3,
                       "down": (delay_ms if down_delay_ms is None else down_delay_ms) / 1e3}
        if min(self._delay.values()) < 0:
            raise ValueError(f"delays must be >= 0 ms, got {self._delay}")
        self._refuse = False
        self._links: set[_Link] = set()
        self._stats = {"accepted": 0, "refused": 0, "resets": 0, "bytes_up": 0, "bytes_down": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """Where clients connect: '127.0.0.1:PORT' (valid after start)."""
        return f"{self.listen[0]}:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    async def start_async(self) -> FaultProxy:
        """Listen on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("fault proxy %s -> %s:%d", self.address, *self.target)
        return self

    async def stop_async(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
        tasks = [task for link in self._links for task in link.tasks]
        for link in list(self._links):
            self._close(link, rst=False)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def start(self) -> FaultProxy:
        """Run the proxy on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as err:  # reported to the caller of start()
                failure.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"faultproxy->{self.target[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"fault proxy did not start within {START_TIMEOUT_S} s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop the thread started by ``start()``."""
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=START_TIMEOUT_S)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ control (any thread)

    def set_delay(self, ms: float | None = None, *, up_ms: float | None = None, down_ms: float | None = None) -> None:
        """Added delay per chunk: ``ms`` for both directions, or ``up_ms`` / ``down_ms`` for one.

        Applies to chunks read from now on; chunks already waiting keep their delay.
        """
        new = {"up": ms if up_ms is None else up_ms, "down": ms if down_ms is None else down_ms}
        for direction, value in new.items():
            if value is not None:
                if value < 0:
                    raise ValueError(f"delay must be >= 0 ms, got {value}")
                self._delay[direction] = value / 1e3

    def stall(self) -> None:
        """Hold every byte in both directions from now on; connections stay open (a black hole)."""
        self._call(lambda: self._flowing.clear())

    def resume(self) -> None:
        """End a stall: bytes held are forwarded in order."""
        self._call(lambda: self._flowing.set())

    def reset(self) -> None:
        """Reset (RST) every open connection, both sides, now."""
        self._call(lambda: [self._close(link, rst=True) for link in list(self._links)])

    def refuse(self, on: bool = True) -> None:
        """While on, every new connection is accepted and reset at once (a dead port, seen as UNAVAILABLE)."""
        self._refuse = on

    def stats(self) -> dict[str, int]:
        """Counts so far: accepted, refused, resets, bytes_up, bytes_down, and open connections now."""
        return {**self._stats, "open": len(self._links)}

    def _call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the proxy's loop and wait for it (or run it now when already on that loop)."""
        if self._loop is None:
            raise RuntimeError("start the proxy first")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn()
            return
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        if not done.wait(START_TIMEOUT_S):
            raise RuntimeError("fault proxy loop did not answer")

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            self._stats["refused"] += 1
            _abort_with_rst(writer)
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError as err:
            log.info("target %s:%d unreachable (%s): resetting the client", *self.target, err)
            _abort_with_rst(writer)
            return
        self._stats["accepted"] += 1
        link = _Link(writer, target_writer)
        self._links.add(link)
        link.tasks = [asyncio.create_task(self._pump(link, reader, target_writer, "up")),
                      asyncio.create_task(self._pump(link, target_reader, writer, "down"))]

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Read chunks, stamp each with its release time, and forward them in order from a second task."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        link.tasks.append(asyncio.create_task(self._send(link, queue, writer, direction)))
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                queue.put_nowait((time.monotonic() + self._delay[direction], chunk))
        except (ConnectionError, OSError):
            self._close(link, rst=True)  # a reset on one side resets the other
            return
        queue.put_nowait((0.0, b""))  # end of stream after what is queued

    async def _send(self, link: _Link, queue: asyncio.Queue, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while chunk := await self._next(queue):
                await self._flowing.wait()
                self._stats[f"bytes_{direction}"] += len(chunk)  # counted first: a reader may look at once
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # pass the half-close on
        except (ConnectionError, OSError):
            self._close(link, rst=True)
            return
        link.ended += 1
        if link.ended == 2:
            self._close(link, rst=False)

    @staticmethod
    async def _next(queue: asyncio.Queue) -> bytes:
        """The next chunk once its release time has come (b"" at end of stream)."""
        release, chunk = await queue.get()
        wait = release - time.monotonic()
        if chunk and wait > 0:
            await asyncio.sleep(wait)
        return chunk

    def _close(self, link: _Link, *, rst: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (link.client, link.target):
            if rst:
                _abort_with_rst(writer)
            else:
                writer.close()
        if rst:
            self._stats["resets"] += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faultproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:50061")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to, e.g. 127.0.0.1:50051")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added delay per chunk, each direction")
    parser.add_argument("--up-delay-ms", type=float, default=None, help="client -> target only (overrides)")
    parser.add_argument("--down-delay-ms", type=float, default=None, help="target -> client only (overrides)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    proxy = FaultProxy(args.target, listen=args.listen, delay_ms=args.delay_ms,
                       up_delay_ms=args.up_delay_ms, down_delay_ms=args.down_delay_ms)

    async def serve() -> None:
        await proxy.start_async()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.stop_async()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
