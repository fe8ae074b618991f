"""The cloud tier: the full-width MatMamba model behind gRPC, with dynamic batching.

Run a replica::

    python -m cloud --checkpoint checkpoints/matmamba-vision-fmnist --port 50051 --metrics-port 9101

Call it (numpy only, no torch)::

    from cloud.client import CloudClient
    async with CloudClient("127.0.0.1:50051") as cloud:
        reply = await cloud.classify(images)          # images: (N, 1, 28, 28) uint8
        assert reply.probs.shape == (len(images), 10)

Modules: ``server`` (grpc.aio server, health, shutdown), ``servicer`` (the Inference RPCs),
``batcher`` (dynamic batching), ``generation`` (streaming generation), ``runner`` (the model),
``metrics`` (Prometheus), ``client`` (the async client), ``serve_app`` (Ray Serve deployment).
``cloud.client`` imports neither torch nor the server modules.
"""
