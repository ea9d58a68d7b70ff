"""Prometheus metrics of one server process (``/metrics``), labelled by worker so that the processes of
``--workers N`` can be told apart: requests by protocol (``v1``, ``oip``), endpoint and status, request
latency, batch sizes, the queue depth and the requests in flight."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The registry and the instruments; ``worker`` labels every sample."""

    def __init__(self, worker: str, max_batch: int):
        self.worker = worker
        self.registry = CollectorRegistry()
        self.requests = Counter("unet_deploy_requests", "HTTP requests by protocol, endpoint and status code",
                                ["worker", "protocol", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("unet_deploy_request_seconds", "Request latency (seconds), by protocol and "
                                 "endpoint", ["worker", "protocol", "endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        buckets = sorted({1, 2, 4, 8, 16, 32, max_batch} & set(range(1, max_batch + 1)))
        self.batch_size = Histogram("unet_deploy_batch_size", "Inputs per model call", ["worker"],
                                    buckets=[float(b) for b in buckets], registry=self.registry)
        self.queue_depth = Gauge("unet_deploy_queue_depth", "Inputs waiting for the model", ["worker"],
                                 registry=self.registry)
        self.in_flight = Gauge("unet_deploy_in_flight", "Prediction requests admitted and not yet answered",
                               ["worker"], registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float, protocol: str = "v1") -> None:
        """One answered request: ``protocol`` is ``v1`` (this server's own API) or ``oip`` (the Open Inference
        Protocol's ``/v2`` routes)."""
        self.requests.labels(self.worker, protocol, endpoint, str(status)).inc()
        self.latency.labels(self.worker, protocol, endpoint).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batch_size.labels(self.worker).observe(size)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(self.worker).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
