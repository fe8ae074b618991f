"""Generate the Python gRPC modules from ``proto/*.proto`` (what ``make proto`` runs).

Usage, from the repository root::

    python -m proto.codegen            # write proto/matmamba_pb2.py, .pyi, matmamba_pb2_grpc.py
    python proto/codegen.py --check    # exit 1 if those files are missing or stale
    python -m proto.codegen --out DIR  # write into DIR instead (tests)

Steps:
1. run ``grpc_tools.protoc`` (the protoc bundled with grpcio-tools, so no system
   protoc is needed) on every ``.proto`` here into a scratch directory;
2. rewrite protoc's top-level ``import matmamba_pb2`` in the generated modules into the
   package-relative ``from . import matmamba_pb2``, so that they import as
   ``from proto import matmamba_pb2_grpc`` without ``proto/`` on ``sys.path``;
3. copy a file into the output directory only when its bytes changed.

The output depends only on the ``.proto`` sources and the grpcio-tools version, so
running it twice changes nothing (step 3 even keeps modification times).
This module imports only the standard library and grpc_tools: it must run before the
generated modules exist.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
# Suffixes of the files protoc writes for each foo.proto: foo_pb2.py, foo_pb2.pyi, foo_pb2_grpc.py.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The ``.proto`` files to compile, sorted so the run order is reproducible."""
    sources = sorted(proto_dir.glob("*.proto"))
    if not sources:
        raise FileNotFoundError(f"no .proto files in {proto_dir}")
    return sources


def generated_names(sources: list[Path]) -> list[str]:
    """File names protoc produces for ``sources``."""
    return [src.stem + suffix for src in sources for suffix in GENERATED_SUFFIXES]


def _run_protoc(sources: list[Path], proto_dir: Path, scratch: Path) -> None:
    """Run grpc_tools' protoc on ``sources`` and write its output into ``scratch``."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={well_known}",
        f"--python_out={scratch}",
        f"--pyi_out={scratch}",
        f"--grpc_python_out={scratch}",
        *(src.name for src in sources),
    ]
    done = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"protoc failed (exit {done.returncode}) on {', '.join(s.name for s in sources)}:\n"
            f"{done.stderr.strip() or done.stdout.strip()}"
        )


def make_imports_relative(text: str, module_names: list[str]) -> str:
    """Turn protoc's ``import foo_pb2 as foo__pb2`` into ``from . import foo_pb2 as foo__pb2``.

    Only the modules generated from this directory (``module_names``) are rewritten;
    ``google.protobuf`` imports already are absolute and stay as they are.
    """
    names = "|".join(re.escape(name) for name in module_names)
    return re.sub(rf"^import ({names}) as (\w+)$", r"from . import \1 as \2", text, flags=re.MULTILINE)


def _postprocess(scratch: Path, names: list[str]) -> dict[str, bytes]:
    """Read protoc's output, fix its imports, and return it by file name."""
    modules = [name.removesuffix(".py") for name in names if name.endswith("_pb2.py")]
    produced = sorted(p.name for p in scratch.iterdir())
    if produced != sorted(names):
        raise RuntimeError(f"protoc wrote {produced}, expected {sorted(names)}")
    out: dict[str, bytes] = {}
    for name in names:
        text = (scratch / name).read_text(encoding="utf-8")
        fixed = make_imports_relative(text, modules)
        leftover = re.search(rf"^import ({'|'.join(modules)})\b.*$", fixed, flags=re.MULTILINE)
        if leftover:
            raise RuntimeError(
                f"{name}: could not make '{leftover.group(0)}' package-relative; "
                "grpcio-tools changed its output format, update proto/codegen.py"
            )
        out[name] = fixed.encode("utf-8")
    return out


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that."""
    if path.exists() and path.read_bytes() == data:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def render(proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """Generate the modules for ``proto_dir`` in memory: {file name: contents}."""
    sources = proto_sources(proto_dir)
    with tempfile.TemporaryDirectory(prefix="matmamba-protoc-") as scratch:
        _run_protoc(sources, proto_dir, Path(scratch))
        return _postprocess(Path(scratch), generated_names(sources))


def generate(out_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Write the generated modules into ``out_dir``; return the files that changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, data in render(proto_dir).items():
        if _write_if_changed(out_dir / name, data):
            changed.append(out_dir / name)
    return changed


def stale_files(out_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generated files in ``out_dir`` that are missing or differ from a fresh generation."""
    return [
        out_dir / name
        for name, data in render(proto_dir).items()
        if not (out_dir / name).exists() or (out_dir / name).read_bytes() != data
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_DIR,
        help="directory to write the generated modules into (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the generated modules are missing or stale",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for path in stale:
            print(f"stale or missing: {path} (run `make proto`)", file=sys.stderr)
        return 1 if stale else 0
    changed = generate(args.out)
    print(
        f"proto: {len(changed)} file(s) updated in {args.out}"
        if changed
        else f"proto: generated modules in {args.out} are up to date"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
