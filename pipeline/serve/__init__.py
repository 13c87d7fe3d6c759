"""Serve stage: an OpenAI-compatible endpoint on Ray Serve.

:mod:`.protocol` (request and response bodies) -> :mod:`.serving` (what the routes do) -> :mod:`.app` (FastAPI
routes, middleware and the Ingress deployment) -> :mod:`.replica` (the Generator deployment running the engine);
:mod:`.errors` is the shared error shape, :mod:`.metrics` the Prometheus metrics of ``/metrics`` and Ray, and
:mod:`.deploy` puts the application on a Ray cluster.
"""
