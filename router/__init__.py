"""The Ray-based router of MatMamba split inference (see docs/ROUTER.md).

Edge device clients call the router (``python -m router``) over gRPC; it answers from the narrow
nested submodel (``edge.worker.EdgeWorker``, run as Ray actors) when that is confident, and
escalates the doubtful inputs to full-width cloud replicas.

Modules: ``ray_setup`` (the one ``init_ray``), ``confidence`` (measures), ``thresholds`` (the
policy file), ``escalation`` (cloud replicas: balancing, health, retry, breakers), ``edge_pool``
(the actors), ``service`` / ``generation`` / ``admin`` (the gRPC servicers), ``metrics``,
``server`` (assembly, health, shutdown), ``traffic_log`` / ``shadow`` (the per-request log and
shadow escalation), ``tune`` / ``retune`` / ``monitor`` (the operator's tools).
"""
