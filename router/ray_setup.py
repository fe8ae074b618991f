"""The one place the project starts or joins a Ray cluster: :func:`init_ray`.

Ray 2.60 with its defaults reaches out of the machine when it starts: it asks the cloud
metadata address (169.254.169.254) which cloud it runs on, looks up DNS and routes towards
a public address (DESIGN.md, "Ray hygiene", measured with strace). ``init_ray`` applies the
recipe that keeps every connection on 127.0.0.1:

1. ``RAY_USAGE_STATS_ENABLED=0`` (no usage report), ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
   and ``RAY_AUTH_MODE=disabled`` (no token file written under ``~``), set in ``os.environ``
   so that Ray's own processes (GCS, raylet, workers) inherit them;
2. ``HOME`` pointed at a private directory that holds ``ray_bootstrap_config.yaml``
   containing ``{}``. Ray reads ``~/ray_bootstrap_config.yaml`` (the file ``ray up`` leaves on
   a cluster head) to learn its cluster provider; when the file is missing it probes the
   cloud metadata service and DNS instead. ``HOME`` is set before ``ray.init`` so that the
   processes Ray spawns see the same directory;
3. ``include_dashboard=False`` and, when this call starts the cluster, its own short
   ``_temp_dir`` (``/tmp/mm-ray-XXXX``: Ray's Unix socket paths live there and must stay
   under the ~107-byte ``sun_path`` limit) and ``_node_ip_address="127.0.0.1"``.

Usage::

    info = init_ray()                          # start a private single-host cluster
    info = init_ray(address="127.0.0.1:6379")  # join one (e.g. started by another process)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Environment every Ray process of the project runs with (see the module docstring).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}
BOOTSTRAP_FILE = "ray_bootstrap_config.yaml"
# Prefix of the private temp dirs; short on purpose (Unix socket paths live below it).
TEMP_PREFIX = "mm-ray-"
LOCAL_IP = "127.0.0.1"
# Object store of a cluster this process starts: the router moves small arrays only.
DEFAULT_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class RayInfo:
    """Where the cluster is: ``address`` (GCS host:port) lets other processes join it."""

    address: str
    temp_dir: str  # the cluster's temp root (Ray's session directory and logs live below it)
    started_here: bool
    own_dir: str  # the directory this call made (HOME, and the temp root when started here)

    def cleanup(self) -> None:
        """Remove the directory this call made (after ray.shutdown; Ray's logs of a cluster started here go too)."""
        shutil.rmtree(self.own_dir, ignore_errors=True)


def make_home(directory: str | Path) -> Path:
    """Create ``directory/ray_bootstrap_config.yaml`` holding ``{}`` and return the directory."""
    home = Path(directory)
    home.mkdir(parents=True, exist_ok=True)
    bootstrap = home / BOOTSTRAP_FILE
    if not bootstrap.exists() or bootstrap.read_text().strip() != "{}":
        bootstrap.write_text("{}\n")
    return home


def _is_local(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host in (LOCAL_IP, "localhost")


def apply_ray_env() -> None:
    """Set :data:`RAY_ENV` in ``os.environ`` (and in Ray's constants when Ray is already imported).

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported: with it
    off, Ray takes 127.0.0.1 as this node's address instead of finding a route to 8.8.8.8. When a
    caller imported ``ray`` before calling :func:`init_ray`, its constant is corrected here.
    """
    os.environ.update(RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        log.debug("ray was imported before init_ray; turning ENABLE_RAY_CLUSTER off in its constants")
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, temp_dir: str | None = None, *, num_cpus: int | None = None,
             num_gpus: int | None = None, object_store_bytes: int | None = DEFAULT_OBJECT_STORE_BYTES) -> RayInfo:
    """Start (``address=None``) or join (``address="host:port"``) a Ray cluster, network-quietly.

    ``temp_dir``: when starting, Ray's session directory root (default a fresh ``/tmp/mm-ray-XXXX``);
    when joining, leave it None unless the cluster was started with that exact directory (Ray
    picks the node to attach to by it). ``num_cpus`` / ``num_gpus`` / ``object_store_bytes`` apply
    only when this call starts the cluster. Returns the cluster's address for others to join.
    """
    apply_ray_env()
    own = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
    os.environ["HOME"] = str(make_home(own / "home"))
    import ray  # after apply_ray_env: Ray reads its environment at import

    kwargs: dict[str, object] = {"include_dashboard": False}
    if address is None:
        kwargs.update(_temp_dir=temp_dir or str(own), _node_ip_address=LOCAL_IP, num_cpus=num_cpus,
                      num_gpus=num_gpus, object_store_memory=object_store_bytes)
    else:
        kwargs["address"] = address
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        if _is_local(address):
            kwargs["_node_ip_address"] = LOCAL_IP
    log.info("%s Ray cluster (HOME %s)", "starting a" if address is None else f"joining the {address}",
             os.environ["HOME"])
    context = ray.init(**kwargs)
    gcs = context.address_info.get("gcs_address") or address or ""
    session_dir = str(context.address_info.get("session_dir") or "")
    return RayInfo(address=str(gcs), temp_dir=str(Path(session_dir).parent) if session_dir else "",
                   started_here=address is None, own_dir=str(own))
