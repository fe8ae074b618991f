"""Fetch Ray for the GPU device into ``.raywhl/``, slim enough to travel (run here, not there).

    python -m bench.ray_wheel            # then carry ".raywhl" and run `bash bench/gpu_suite.sh router`

The device image has no Ray and a call carries at most 64 MiB, working tree included; Ray 2.60's
cp312 wheel is 76 MiB, 31 MiB of it the Java runtime (``ray/jars``) and 3 MiB the dashboard's web
client, which the router never starts (``include_dashboard=False``). This downloads the wheel from
PyPI, drops those and the libraries the router never imports (RLlib, Tune, Train, Data, LLM), with
their RECORD lines, and adds the one dependency the image lacks (jsonschema and its own), all for
CPython 3.12 on manylinux x86_64.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RAY = "ray==2.60.0"  # the version pyproject.toml pins
EXTRA = ["jsonschema==4.25.1", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1"]
DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/tune/", "ray/train/", "ray/data/", "ray/llm/")
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]


def download(specs: list[str], dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest), *specs],
                   check=True)


def slim(wheel: Path, dest: Path) -> Path:
    """Copy ``wheel`` into ``dest`` without the DROP folders; returns the new file."""
    out = dest / wheel.name
    prefixes = tuple(p.encode() for p in DROP)
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename.startswith(DROP):
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(prefixes))
            zout.writestr(item, data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_wheel", description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=Path(".raywhl"), help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download([RAY], Path(tmp))
        wheel = slim(next(Path(tmp).glob("ray-*.whl")), args.dest)
    download(EXTRA, args.dest)
    total = sum(f.stat().st_size for f in args.dest.glob("*.whl"))
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB; {args.dest}: {total / 2**20:.1f} MiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
