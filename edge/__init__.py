"""Edge side of MatMamba split inference.

- ``edge.client``: the edge device client SDK (``EdgeClient``) and ``python -m edge`` (its CLI).
  Neither imports torch: an edge device needs grpcio, numpy and (for image files) Pillow only.
- ``edge.worker``: the edge node runtime, the narrow-submodel worker the router runs as Ray actors
  (imports torch and matmamba; never imported by the client).

This package's ``__init__`` imports nothing, so ``import edge.client`` stays torch-free.
"""
