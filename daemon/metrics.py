"""Prometheus metrics (prometheus-client) on ``/metrics``, fed off the frame path.

Per-decision metrics (decisions by verdict and reason, deadline misses, end-to-end and
stage latency histograms) are updated by ``MetricsSink`` on its own thread. Gauges that
describe the present (frames received, frames in flight, sink queues and failures, the
model, GPU memory) are read when Prometheus scrapes, through ``sources`` callables the
server provides, so they cost nothing between scrapes. Each daemon has its own registry.
GPU memory comes from NVML (``pynvml``, from the nvidia-ml-py package) when it is
installed and the backend is on a GPU; otherwise the metric is absent.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from daemon.http import HttpServer, Response
from daemon.outputs import OBSERVER_NICE, Sink
from daemon.protocol import Decision
from engines.version import VERSION

log = structlog.get_logger("inspectd.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
Sources = Callable[[], dict[str, Any]]


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsSink(Sink):
    """Counts decisions into a private registry; ``add_routes`` serves it on /metrics."""

    name = "metrics"
    nice = OBSERVER_NICE

    def __init__(self, sources: Sources = dict) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        super().__init__(maxsize=1024)
        self.registry = CollectorRegistry()
        self._sources = sources
        self.decisions = Counter(
            "inspectd_decisions",
            "Decisions published, by verdict and reason",
            ["verdict", "reason"],
            registry=self.registry,
        )
        self.deadline_missed = Counter(
            "inspectd_deadline_misses", "Decisions published after their deadline", registry=self.registry
        )
        self.latency = Histogram(
            "inspectd_decision_latency_seconds",
            "Receipt to decision, end to end inside the daemon",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "inspectd_stage_seconds",
            "Wall time of each frame-path stage (prepare = decode + registration)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(self._sources))
        build = build_info()
        Gauge("inspectd_build_info", "The running inspectd (value 1)", list(build), registry=self.registry).labels(
            **build
        ).set(1)

    def send(self, decision: Decision) -> None:
        self.decisions.labels(decision.verdict, decision.reason).inc()
        if not decision.deadline_met:
            self.deadline_missed.inc()
        self.latency.observe(decision.latency_ms / 1000)
        for stage in ("prepare", "infer", "decide"):
            ms = decision.timings_ms.get(stage)
            if ms is not None:
                self.stages.labels(stage).observe(ms / 1000)
        self.sent += 1

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def add_routes(self, http: HttpServer) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        http.route("/metrics", lambda _: Response(body=self.render(), content_type=CONTENT_TYPE_LATEST))


def build_info() -> dict[str, str]:
    """Labels of ``inspectd_build_info``: the inspectd version and the runtime it stands on."""
    from engines.bundle import package_versions

    packages = package_versions()
    return {
        "version": VERSION,
        "python": platform.python_version(),
        "numpy": packages["numpy"],
        "opencv": packages["opencv-python-headless"],
        "onnxruntime": packages["onnxruntime"],
    }


class _Live:
    """Scrape-time gauges from the server's ``sources()`` snapshot."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def describe(self) -> list[Any]:
        return []  # collected only at scrape time (avoids a collect() call at registration)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        try:
            src = self._sources()
        except Exception as exc:  # a scrape must not fail because one source did
            log.warning("metrics_source_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if "frames_received" in src:
            yield CounterMetricFamily(
                "inspectd_frames_received", "Messages read from the frame sockets", src["frames_received"]
            )
        if "peers_dropped" in src:
            yield CounterMetricFamily(
                "inspectd_peers_dropped",
                "Frame-socket peers disconnected (a message over the size limit, or a sender leaving)",
                src["peers_dropped"],
            )
        if "slot_grabbers" in src:
            grabbers = CounterMetricFamily(
                "inspectd_frame_slot_handouts",
                "Connections to the frames_shm socket: slots handed out (ok) or not (failed)",
                labels=["outcome"],
            )
            grabbers.add_metric(["ok"], src["slot_grabbers"])
            grabbers.add_metric(["failed"], src["slot_handouts_failed"])
            yield grabbers
        if "unidentified" in src:
            yield CounterMetricFamily(
                "inspectd_unidentified_messages",
                "Bad messages without a readable frame id (no decision)",
                src["unidentified"],
            )
        if "t_capture_dropped" in src:
            yield CounterMetricFamily(
                "inspectd_capture_times_dropped",
                "t_capture_ns header values dropped as unreadable (informational; the frame is still inspected)",
                src["t_capture_dropped"],
            )
        yield from _threads(src)
        if "in_flight" in src:
            yield GaugeMetricFamily("inspectd_queue_depth", "Frames admitted and not yet decided", src["in_flight"])
        if "queue_limit" in src:
            yield GaugeMetricFamily(
                "inspectd_queue_limit", "queue_depth: frames in flight before overload", src["queue_limit"]
            )
        if "cpu_latency_held" in src:
            yield GaugeMetricFamily(
                "inspectd_cpu_latency_request_held",
                "1 while the daemon holds its CPU wake-up latency request (cpu_wakeup_latency_us)",
                int(src["cpu_latency_held"]),
            )
        if "ready" in src:
            yield GaugeMetricFamily(
                "inspectd_ready", "1 when the model is loaded and the sockets bound", int(src["ready"])
            )
        sinks = src.get("sinks") or {}
        if sinks:
            queued = GaugeMetricFamily(
                "inspectd_sink_queue", "Decisions waiting in each output's queue", labels=["sink"]
            )
            counts = {
                key: CounterMetricFamily(f"inspectd_sink_{key}", f"Decisions {key} by each output", labels=["sink"])
                for key in ("sent", "dropped", "failed")
            }
            for name, stats in sinks.items():
                queued.add_metric([name], stats.get("queued", 0))
                for key, family in counts.items():
                    family.add_metric([name], stats.get(key, 0))
            yield queued
            yield from counts.values()
            yield from _line_outputs(sinks)
        yield from _http(src.get("http"))
        model = src.get("model")
        if model:
            info = InfoMetricFamily("inspectd_model", "The model bundle in service")
            info.add_metric([], {k: str(v) for k, v in model.items()})
            yield info
        gpu = src.get("gpu_memory")
        if gpu:
            used = GaugeMetricFamily("inspectd_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            total = GaugeMetricFamily("inspectd_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
            for index, (u, t) in enumerate(gpu):
                used.add_metric([str(index)], u)
                total.add_metric([str(index)], t)
            yield used
            yield total


# Counters of the line outputs (outputs.py, actuator.py): stat key -> (metric, help).
ACTUATOR_COUNTS = {
    "records": ("inspectd_actuator_records", "Result records written"),
    "coalesced": ("inspectd_actuator_coalesced", "Decisions covered by a later one's record (fell behind)"),
    "default_rejects": ("inspectd_actuator_default_rejects", "Rejects fired at a deadline without a result record"),
    "unfired_rejects": ("inspectd_actuator_unfired_rejects", "Reject signals the output could not give (link down)"),
    "missed_results": ("inspectd_actuator_missed_results", "Decisions first recorded after the link came back"),
}


def _line_outputs(sinks: dict[str, dict[str, Any]]) -> Iterator[Any]:
    """Where each line output's guarantee ends: undelivered replies, stalled subscribers, the actuators' counts."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    undelivered = CounterMetricFamily(
        "inspectd_sink_undelivered",
        "Replies handed to ZeroMQ that could not be routed (the imagezmq sender had left or stopped reading)",
        labels=["sink"],
    )
    for name, stats in sinks.items():
        if "undelivered" in stats:
            undelivered.add_metric([name], stats["undelivered"])
    yield undelivered
    pub = sinks.get("zmq-pub")
    if pub is not None:
        yield CounterMetricFamily(
            "inspectd_decision_subscriber_stalls",
            "Times a decision subscriber's queue was found full; it misses decisions until it reads again (seq gaps)",
            pub.get("subscriber_stalls", 0),
        )
        yield GaugeMetricFamily(
            "inspectd_decision_subscriptions",
            "Subscriptions live on the decisions socket (topic filters; 0: nobody hears the decisions)",
            pub.get("subscriptions", 0),
        )
    actuators = {name: stats for name, stats in sinks.items() if "default_rejects" in stats}
    for key, (metric, text) in ACTUATOR_COUNTS.items():
        family = CounterMetricFamily(metric, text, labels=["sink"])
        for name, stats in actuators.items():
            family.add_metric([name], stats.get(key, 0))
        yield family
    plc = sinks.get("plc")
    if plc is not None:
        yield GaugeMetricFamily("inspectd_plc_connected", "1 while the Modbus link is up", plc.get("connected", 0))


def _http(stats: dict[str, int] | None) -> Iterator[Any]:
    """The HTTP side door's limits (http.py): open connections, refusals over the cap, requests that timed out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not stats:
        return
    yield GaugeMetricFamily("inspectd_http_connections", "Open HTTP connections, event streams included", stats["open"])
    yield GaugeMetricFamily("inspectd_http_streams", "Open event streams (the status page)", stats["streams"])
    yield CounterMetricFamily(
        "inspectd_http_refused", "Connections answered 503 (http_max_connections reached)", stats["refused"]
    )
    yield CounterMetricFamily(
        "inspectd_http_timeouts",
        "Connections closed because no whole request came within http_timeout_s",
        stats["timed_out"],
    )


def _threads(src: dict[str, Any]) -> Iterator[Any]:
    """Supervision (supervision.py): deaths, restarts and stalls per thread, and overall health."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if "healthy" in src:
        yield GaugeMetricFamily(
            "inspectd_healthy", "1 while no frame-path thread is dead or stalled (/healthz)", int(src["healthy"])
        )
    threads = src.get("threads") or {}
    if not threads:
        return
    deaths = CounterMetricFamily(
        "inspectd_thread_deaths",
        "Supervised threads that died (an exception escaped their loop); pool stage tasks count as 'stages'",
        labels=["thread", "policy"],
    )
    restarts = CounterMetricFamily("inspectd_thread_restarts", "Observer threads restarted in place", labels=["thread"])
    stalls = CounterMetricFamily(
        "inspectd_thread_stalls", "Times a thread held one unit of work longer than stall_s", labels=["thread"]
    )
    stalled = GaugeMetricFamily("inspectd_thread_stalled", "1 while the thread is stalled", labels=["thread"])
    for name, stats in threads.items():
        deaths.add_metric([name, stats["policy"]], stats["deaths"])
        restarts.add_metric([name], stats["restarts"])
        stalls.add_metric([name], stats["stalls"])
        stalled.add_metric([name], stats["stalled"])
    yield from (deaths, restarts, stalls, stalled)


class GpuMemory:
    """(used, total) bytes per GPU through NVML, or None when NVML is not there."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # not installed, no driver, no GPU
            self._nvml = None

    def __call__(self) -> list[tuple[int, int]] | None:
        if self._nvml is None:
            return None
        out = []
        try:
            for i in range(self._nvml.nvmlDeviceGetCount()):
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(i))
                out.append((int(mem.used), int(mem.total)))
        except Exception:
            return None
        return out
