"""``python -m cloud --workers N``: N server processes on one port, started and watched by a parent.

One asyncio gRPC process tops out near 2,200 requests/s (docs/BENCHMARKS.md), far below what the
GPU does with CUDA graphs. Here the parent starts N copies of ``python -m cloud`` (subprocesses of
the same module with the same flags), each loading the model and running its own batcher, all
listening on one port through SO_REUSEPORT: the kernel spreads *connections* over them.

- **Port**: the parent checks that the port is free, then holds it with a bound (not listening)
  SO_REUSEPORT socket for its whole life; port 0 is resolved there, so the workers all get the
  same number. Nothing else can take the port between worker starts.
- **Control**: one socketpair per worker (``--control-fd``, not a user flag). The worker sends
  ``warm`` after its warm-up and waits; when every worker is warm the parent sends ``serve``, each
  worker turns its health SERVING and answers ``serving``; then the parent logs that it serves.
  End of file on the socket (the parent died) makes a worker drain and exit.
- **Signals**: SIGTERM / SIGINT to the parent are forwarded as SIGTERM to every worker (each in
  its own session, so a terminal's Ctrl-C reaches the parent only), which drains for ``--grace``
  seconds; the parent exits 0 when every worker exited 0.
- **Failure**: a worker that exits on its own (a bad checkpoint at start-up, a crash, SIGKILL)
  makes the parent log which one and how, stop the others, and exit 1.
- **Metrics**: the workers write prometheus_client's multiprocess files into a temporary
  directory the parent owns (``PROMETHEUS_MULTIPROC_DIR``); the parent serves their sum on
  ``--metrics-port`` and removes the directory at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile

from matmamba.pretrained import read_config

from .metrics import MetricsEndpoint, multiprocess_endpoint
from .server import ServerConfig, host_port

log = logging.getLogger(__name__)

WARM, SERVE, SERVING = b"warm\n", b"serve\n", b"serving\n"
STOP_MARGIN_S = 30.0  # beyond --grace, before a worker that has not exited is killed
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ParentLink:
    """A worker's end of its control socket (``--control-fd``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._go = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._listener: asyncio.Task | None = None

    async def open(self, on_gone) -> None:
        """Start listening; ``on_gone()`` is called when the parent closes the socket (it died)."""
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self._fd))
        self._listener = asyncio.create_task(self._listen(reader, on_gone))

    async def _listen(self, reader: asyncio.StreamReader, on_gone) -> None:
        while line := await reader.readline():
            if line == SERVE:
                self._go.set()
        log.warning("the parent process is gone; draining")
        on_gone()

    async def _send(self, line: bytes) -> None:
        self._writer.write(line)
        await self._writer.drain()

    async def warm(self) -> None:
        """Tell the parent this worker is warm, and wait until every worker is."""
        log.info("warm; waiting for the other workers before turning SERVING")
        await self._send(WARM)
        await self._go.wait()

    async def serving(self) -> None:
        await self._send(SERVING)


class WorkerFailed(Exception):
    def __init__(self, worker: Worker, code: int) -> None:
        super().__init__(f"worker {worker.index} (pid {worker.pid}) {describe_exit(code)}")
        self.worker, self.code = worker, code


def describe_exit(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class Worker:
    """One ``python -m cloud`` child and the parent's end of its control socket."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.index, self.proc, self.reader, self.writer = index, proc, reader, writer

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(cls, index: int, argv: list[str], port: int, env: dict[str, str]) -> Worker:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        cmd = [sys.executable, "-m", "cloud", *argv,  # later flags win: the worker's port, no metrics endpoint
               "--workers", "1", "--port", str(port), "--metrics-port", "-1", "--control-fd", str(fd)]
        # Own session: a terminal's Ctrl-C reaches the parent only, which forwards it; a worker exiting by
        # itself is then always a failure, never a race with the parent's own signal.
        proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=(fd,), env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    start_new_session=True)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        return cls(index, proc, reader, writer)

    async def expect(self, line: bytes) -> None:
        try:
            got = await self.reader.readline()
        except OSError:  # the connection reset: the worker is gone
            got = b""
        if got != line:  # end of file: the worker is exiting
            raise WorkerFailed(self, await self.proc.wait())

    def send(self, line: bytes) -> None:
        self.writer.write(line)

    def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)


def reserve_port(host: str, port: int) -> socket.socket:
    """Check that ``host:port`` is free and hold it (bound, not listening, SO_REUSEPORT) for the workers."""
    target = host_port(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        if port != 0:  # without SO_REUSEPORT this bind fails if anything, a listener with it included, holds the port
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        holder = socket.socket(family, kind, proto)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError as err:
        raise OSError(f"cannot listen on {target} ({err.strerror}); is the port in use? pick another with --port") \
            from None
    return holder


async def _ready(workers: list[Worker]) -> None:
    await asyncio.gather(*(w.expect(WARM) for w in workers))
    for worker in workers:
        worker.send(SERVE)
    await asyncio.gather(*(w.expect(SERVING) for w in workers))


async def _stop_all(workers: list[Worker], grace: float) -> list[int]:
    """SIGTERM every worker still running, wait for them (killing those that outlive the grace), exit codes."""
    for worker in workers:
        worker.terminate()
    waits = [asyncio.create_task(w.proc.wait()) for w in workers]
    _, late = await asyncio.wait(waits, timeout=grace + STOP_MARGIN_S)
    for worker, wait in zip(workers, waits, strict=True):
        if wait in late:
            log.error("worker %d (pid %d) still running %.0f s after SIGTERM; killing it", worker.index, worker.pid,
                      grace + STOP_MARGIN_S)
            worker.proc.kill()
    return [await wait for wait in waits]


def _failure(done: set[asyncio.Task], exits: dict[asyncio.Task, Worker], ready: asyncio.Task) -> WorkerFailed | None:
    for task in done:
        if task in exits:
            return WorkerFailed(exits[task], task.result())
    if ready in done and isinstance(ready.exception(), WorkerFailed):
        return ready.exception()
    return None


async def supervise(argv: list[str], config: ServerConfig, count: int, port: int, env: dict[str, str]) -> int:
    """Start ``count`` workers on ``port``, wait for a signal or a worker's death, stop them all; the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [await Worker.spawn(i, argv, port, env) for i in range(count)]
    log.info("started %d workers on %s: pids %s", count, host_port(config.host, port),
             ", ".join(str(w.pid) for w in workers))
    exits = {asyncio.create_task(w.proc.wait()): w for w in workers}
    stopping = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(_ready(workers))
    done, _ = await asyncio.wait({ready, stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
    phase = "during start-up"
    if ready in done and ready.exception() is None:
        phase = "while serving"
        log.info("all %d workers serving on %s", count, host_port(config.host, port))
        done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
    failed = None if stopping in done else _failure(done, exits, ready)
    ready.cancel()
    await asyncio.gather(ready, return_exceptions=True)
    if failed is not None:
        log.error("%s %s; stopping the other workers", failed, phase)
    else:
        log.info("signal received; draining %d workers (up to %.1f s)", count, config.grace_s)
    codes = await _stop_all(workers, config.grace_s)
    for worker, code in zip(workers, codes, strict=True):
        if code != 0 and (failed is None or worker is not failed.worker):
            log.error("worker %d (pid %d) %s while stopping", worker.index, worker.pid, describe_exit(code))
    for task in (stopping, *exits):
        task.cancel()
    return 1 if failed is not None or any(codes) else 0


def run_workers(argv: list[str], config: ServerConfig, count: int) -> int:
    """``python -m cloud --workers N``: the parent. ``argv`` is the command line, passed on to every worker."""
    try:
        read_config(config.checkpoint)  # a missing checkpoint is one clear line here, not one per worker
        holder = reserve_port(config.host, config.port)
    except (OSError, ValueError) as err:
        log.error("cannot serve: %s", err)
        return 1
    port = holder.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    with holder, contextlib.ExitStack() as cleanup:
        endpoint: MetricsEndpoint | None = None
        if config.metrics_port is not None:
            env[MULTIPROC_ENV] = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="matmamba-cloud-metrics-"))
            endpoint = multiprocess_endpoint(env[MULTIPROC_ENV])
            try:
                endpoint.serve(config.host, config.metrics_port)
            except OSError as err:
                log.error("cannot serve: metrics on %s: %s; pick another --metrics-port",
                          host_port(config.host, config.metrics_port), err)
                return 1
            cleanup.callback(endpoint.close)
        code = asyncio.run(supervise(argv, config, count, port, env))
        log.info("stopped (exit code %d)", code)
        return code
