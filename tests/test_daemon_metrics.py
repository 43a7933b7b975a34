"""Prometheus /metrics: decisions by verdict and reason, latency histograms, live gauges, model info."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.test_daemon_support import Client, FakeInspector, image, running


def scrape(url: str) -> dict:
    """One /metrics scrape as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_follow_the_decisions() -> None:
    """After three frames /metrics counts them by reason and exposes latency, stages, queue depth and model."""
    # A cycle of a minute: no frame meets a deadline reject, however loaded the machine is.
    with running(FakeInspector(), queue_depth=8, cycle_ms=60_000) as (server, _), Client(server) as client:
        for i in range(3):
            client.send(i, image(defect=i == 1))
        assert len(client.decisions(3, timeout_s=30)) == 3
        # the metrics sink has its own queue: it follows the published decisions; wait for it (bounded)
        url = f"http://{server.endpoints['http']}/metrics"
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(url)
            counted = sum(v for (name, _), v in samples.items() if name == "inspectd_decisions_total")
            published = samples.get(("inspectd_sink_sent_total", (("sink", "zmq-pub"),)), 0)  # counted after the send
            if (counted >= 3 and published >= 3) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert samples[("inspectd_decisions_total", (("reason", "ok"), ("verdict", "pass")))] == 2
    assert samples[("inspectd_decisions_total", (("reason", "defect"), ("verdict", "reject")))] == 1
    assert samples[("inspectd_frames_received_total", ())] == 3
    assert samples[("inspectd_decision_latency_seconds_count", ())] == 3
    assert samples[("inspectd_stage_seconds_count", (("stage", "infer"),))] == 3
    assert samples[("inspectd_queue_depth", ())] == 0 and samples[("inspectd_ready", ())] == 1
    assert ("inspectd_deadline_misses_total", ()) in samples
    assert any(name == "inspectd_model_info" and ("bundle_id", "fake-1") in labels for name, labels in samples)
    assert samples[("inspectd_sink_sent_total", (("sink", "zmq-pub"),))] == 3
    assert samples[("inspectd_decision_subscriber_stalls_total", ())] == 0
    assert samples[("inspectd_decision_subscriptions", ())] == 1  # the client's subscriber
    assert samples[("inspectd_http_connections", ())] >= 1  # the scrape itself
    assert samples[("inspectd_http_refused_total", ())] == 0 and samples[("inspectd_http_timeouts_total", ())] == 0
