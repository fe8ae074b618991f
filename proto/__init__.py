"""gRPC wire of MatMamba split inference: protobuf package ``matmamba.v1``.

``matmamba.proto`` is the source of truth. ``make proto`` (``python -m proto.codegen``)
generates, next to it and outside git:

- ``matmamba_pb2.py`` / ``.pyi``: the messages and enums (``Tensor``, ``ClassifyRequest``, ...);
- ``matmamba_pb2_grpc.py``: stubs and servicer bases (``InferenceStub``,
  ``InferenceServicer``, ``add_InferenceServicer_to_server``, ``RouterAdminStub``, ...).

Import them as ``from proto import matmamba_pb2, matmamba_pb2_grpc``; ``proto.tensors``
converts numpy arrays to and from ``Tensor`` (numpy only, safe for edge clients).
Importing a generated module before ``make proto`` raises
:class:`GeneratedCodeMissingError` (an ``ImportError``) that says so.

Note: proto-plus (pulled in by Ray through google-api-core) installs a top-level
package also named ``proto``. This one wins only when the repository root comes
before site-packages on ``sys.path`` (``python -m ...`` from the root, or pytest's
``pythonpath = ["."]``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

# Modules that ``make proto`` writes into this package.
GENERATED_MODULES = ("matmamba_pb2", "matmamba_pb2_grpc")


class GeneratedCodeMissingError(ImportError):
    """A generated protobuf module was imported before ``make proto`` created it."""


class _MissingGeneratedCodeFinder(importlib.abc.MetaPathFinder):
    """Turns "No module named proto.matmamba_pb2" into an error that says what to run.

    It sits last on ``sys.meta_path``, so it is only asked after the normal finders
    failed to find a generated module's file.
    """

    def __init__(self, package: str) -> None:
        self.names = {f"{package}.{name}" for name in GENERATED_MODULES}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        raise GeneratedCodeMissingError(
            f"{fullname} has not been generated yet: run `make proto` "
            "(or `python -m proto.codegen`) in the repository root, which compiles "
            f"proto/matmamba.proto into {', '.join(GENERATED_MODULES)}.",
            name=fullname,
        )


if not any(
    isinstance(f, _MissingGeneratedCodeFinder) and __name__ + ".matmamba_pb2" in f.names
    for f in sys.meta_path
):
    sys.meta_path.append(_MissingGeneratedCodeFinder(__name__))
