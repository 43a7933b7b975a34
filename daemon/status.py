"""The operator status page: one read-only page, readable from two metres, updated live.

``StatusBoard`` is a sink: it counts decisions on its own thread (since start and per
shift), keeps the last N, the latency and throughput windows and the latest reject's
evidence, and renders that reject's thumbnail (image, anomaly heatmap, defect boxes) on
the same thread, at most once per ``RENDER_MIN_S`` (the newest reject wins). Nothing here
runs on the frame path: the scheduler only queues the decision. Only the newest reject's
evidence is kept (one slot, not the queue), so a burst of rejects pins one frame, not many.

HTTP routes (all GET, none changes anything):
  /             the page (inline HTML, CSS and JS: the line has no internet)
  /status.json  the current snapshot
  /events       server-sent events: the snapshot at most every ``status_refresh_s``
  /reject.jpg   the latest reject's thumbnail (404 before the first reject)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import structlog

from daemon.http import HttpServer, Response
from daemon.outputs import OBSERVER_NICE, Sink
from daemon.protocol import Decision, Evidence

log = structlog.get_logger("inspectd.status")

SYSTEM_REASONS = ("deadline", "overload", "bad_frame", "error")  # rejects the system, not the part, caused
THUMB_WIDTH = 480
MAX_PICK = 4  # pixels stepped over before the thumbnail's area resize (a defect of 4 px or more keeps a sample)
RENDER_MIN_S = 1.0
HEARTBEAT_S = 2.0  # an SSE message at least this often (model age, health), even with no frames
LATENCY_WINDOW = 1000
RATE_WINDOW_S = 10.0


class Tally:
    """Pass / reject / per-reason counts since ``since`` (a wall-clock time)."""

    def __init__(self) -> None:
        self.since = time.time()
        self.passed = 0
        self.reasons: Counter[str] = Counter()

    def add(self, decision: Decision) -> None:
        if decision.verdict == "pass":
            self.passed += 1
        else:
            self.reasons[decision.reason] += 1

    def to_dict(self) -> dict[str, Any]:
        rejected = sum(self.reasons.values())
        total = self.passed + rejected
        return {
            "since": dt.datetime.fromtimestamp(self.since).isoformat(timespec="seconds"),
            "total": total,
            "pass": self.passed,
            "reject": rejected,
            "errors": sum(self.reasons[r] for r in SYSTEM_REASONS),
            "reasons": dict(self.reasons.most_common()),
            "reject_rate": round(rejected / total, 4) if total else 0.0,
        }


def shift_start(now: float, shifts: list[tuple[int, int]]) -> float | None:
    """Wall time at which the shift containing ``now`` started (None: no shifts configured)."""
    if not shifts:
        return None
    today = dt.datetime.fromtimestamp(now)
    starts = [today.replace(hour=h, minute=m, second=0, microsecond=0) for h, m in shifts]
    past = [s for s in starts if s.timestamp() <= now]
    start = max(past) if past else max(starts) - dt.timedelta(days=1)
    return start.timestamp()


def render_reject(evidence: Evidence, decision: Decision, width: int = THUMB_WIDTH) -> bytes | None:
    """A JPEG thumbnail of the frame with the anomaly heatmap (warped into frame pixels) and defect boxes."""
    image = evidence.image
    if image is None:
        return None
    image = np.asarray(image)
    h, w = image.shape[:2]
    scale = min(1.0, width / w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    thumb = cv2.resize(_picked(image, width), (tw, th), interpolation=cv2.INTER_AREA)
    if thumb.dtype != np.uint8:
        thumb = (thumb >> 8).astype(np.uint8)
    if thumb.ndim == 2:
        thumb = cv2.cvtColor(thumb, cv2.COLOR_GRAY2BGR)
    amap = evidence.anomaly_map
    threshold = decision.threshold or 1.0
    if amap is not None:
        small = cv2.resize(_picked(np.asarray(amap, np.float32), width), (tw, th), interpolation=cv2.INTER_AREA)
        if evidence.pose_matrix is not None:  # reference -> frame; a uniform scale keeps the linear part
            matrix = np.array(evidence.pose_matrix, np.float64).reshape(2, 3).copy()
            matrix[:, 2] *= scale
            small = cv2.warpAffine(small, matrix, (tw, th), flags=cv2.INTER_LINEAR, borderValue=0)
        level = np.clip(small / (2 * threshold), 0, 1)
        heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = (np.clip((small / threshold - 0.5) * 1.2, 0, 0.65))[..., None]
        thumb = (thumb * (1 - alpha) + heat * alpha).astype(np.uint8)
    for defect in decision.defects:
        x0, y0, x1, y1 = (round(v * scale) for v in defect["bbox"])
        cv2.rectangle(thumb, (x0 - 2, y0 - 2), (x1 + 1, y1 + 1), (0, 0, 255), 2)
    ok, jpeg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return jpeg.tobytes() if ok else None


def _picked(array: np.ndarray, width: int) -> np.ndarray:
    """Every ``step``-th pixel of ``array`` (step at most ``MAX_PICK``, the result still twice ``width`` wide or more),
    copied by numpy on the calling thread. An area resize of the whole 5120 px frame and its 100 MB map ran on
    OpenCV's pool, on every core at the pool's priority: 94 ms of CPU per thumbnail taken from the frames."""
    step = max(1, min(MAX_PICK, array.shape[1] // (2 * width)))
    return np.ascontiguousarray(array[::step, ::step]) if step > 1 else array


class StatusBoard(Sink):
    """Counts, windows and the latest reject for the page; serves its HTTP routes."""

    name = "status"
    idle_s = RENDER_MIN_S
    nice = OBSERVER_NICE

    def __init__(
        self,
        *,
        cycle_ms: float,
        recent: int = 20,
        shifts: list[tuple[int, int]] | None = None,
        refresh_s: float = 1.0,
        health: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        super().__init__(maxsize=256)
        self.cycle_ms = cycle_ms
        self.refresh_s = refresh_s
        self._shifts = shifts or []
        self._health = health
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._closed = False
        self.started = time.time()
        self.total = Tally()
        self.shift = Tally()
        self._shift_started = shift_start(self.started, self._shifts)
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._times: deque[float] = deque()
        self._latest: dict[str, Any] | None = None
        self._model: dict[str, Any] = {"id": None, "loaded_at": None}
        self._pending: Decision | None = None  # newest reject with evidence, not yet rendered
        self._rendered_at = 0.0
        self._reject_jpeg: bytes | None = None
        self._reject_info: dict[str, Any] | None = None
        self._snapshot: tuple[float, int, bytes] | None = None

    # -- inputs ------------------------------------------------------------------------------
    def set_model(self, bundle_id: str) -> None:
        with self._changed:
            self._model = {"id": bundle_id, "loaded_at": time.time()}
            self._bump()

    def wants_evidence(self, decision: Decision) -> bool:
        return decision.verdict != "pass"

    def offer(self, decision: Decision) -> None:
        if decision.evidence is not None:
            if decision.evidence.image is not None:
                self._pending = decision  # one slot: a newer reject replaces an unrendered older one
            decision = dataclasses.replace(decision, evidence=None)
        super().offer(decision)

    def send(self, decision: Decision) -> None:
        now = time.time()
        row = {
            "frame_id": decision.frame_id,
            "camera_id": decision.camera_id,
            "part_id": decision.part_id,
            "verdict": decision.verdict,
            "reason": decision.reason,
            "score": None if decision.score is None or not np.isfinite(decision.score) else round(decision.score, 3),
            "latency_ms": round(decision.latency_ms, 1),
            "time": dt.datetime.fromtimestamp(decision.t_decided_ns / 1e9).strftime("%H:%M:%S"),
            "defects": len(decision.defects) + decision.defects_more,
        }
        with self._changed:
            self._roll_shift(now)
            self.total.add(decision)
            self.shift.add(decision)
            self._recent.appendleft(row)
            self._latency.append(decision.latency_ms)
            self._times.append(now)
            self._latest = row
            self._bump()
        self.sent += 1
        if self._pending is not None and time.monotonic() - self._rendered_at >= RENDER_MIN_S:
            self.idle()

    def idle(self) -> None:
        """Render the newest pending reject (on this sink's thread)."""
        decision, self._pending = self._pending, None
        if decision is None or decision.evidence is None:
            return
        self._rendered_at = time.monotonic()
        jpeg = render_reject(decision.evidence, decision)
        info = {
            "frame_id": decision.frame_id,
            "camera_id": decision.camera_id,
            "reason": decision.reason,
            "score": None if decision.score is None or not np.isfinite(decision.score) else round(decision.score, 3),
            "defects": decision.defects[:5],
        }
        with self._changed:
            self._reject_jpeg = jpeg
            self._reject_info = {**info, "version": self._version + 1} if jpeg else None
            self._bump()

    def close_resources(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _roll_shift(self, now: float) -> None:
        start = shift_start(now, self._shifts)
        if start is not None and start != self._shift_started:
            self._shift_started = start
            self.shift = Tally()
            self.shift.since = start

    # -- outputs -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            self._roll_shift(now)
            while self._times and now - self._times[0] > RATE_WINDOW_S:
                self._times.popleft()
            lat = np.fromiter(self._latency, float) if self._latency else None
            window = min(RATE_WINDOW_S, max(now - self.started, 1e-3))
            loaded = self._model["loaded_at"]
            latest = self._latest
            out = {
                "version": self._version,
                "state": "IDLE" if latest is None else ("PASS" if latest["verdict"] == "pass" else "REJECT"),
                "latest": self._latest,
                "total": self.total.to_dict(),
                "shift": {**self.shift.to_dict(), "configured": bool(self._shifts)},
                "throughput_hz": round(len(self._times) / window, 2),
                "latency_ms": {
                    "p50": None if lat is None else round(float(np.percentile(lat, 50)), 1),
                    "p99": None if lat is None else round(float(np.percentile(lat, 99)), 1),
                    "cycle": self.cycle_ms,
                },
                "model": {"id": self._model["id"], "age_s": None if loaded is None else round(now - loaded)},
                "recent": list(self._recent),
                "reject_image": self._reject_info,
                "uptime_s": round(now - self.started),
            }
        out["health"] = self._health()
        return out

    def snapshot_json(self) -> bytes:
        """The snapshot, built at most once per ``refresh_s`` (many viewers cost one build)."""
        cached = self._snapshot
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.refresh_s and cached[1] == self._version:
            return cached[2]
        body = json.dumps(self.snapshot(), separators=(",", ":"), default=str).encode()
        self._snapshot = (now, self._version, body)
        return body

    def events(self) -> Iterator[bytes]:
        """SSE: a snapshot now, then on each change (at most every ``refresh_s``) or every HEARTBEAT_S."""
        yield b"retry: 2000\n\n"
        seen = -1
        while True:
            with self._changed:
                if self._closed:
                    return
                if self._version == seen:
                    self._changed.wait(HEARTBEAT_S)
                if self._closed:
                    return
                seen = self._version
            yield b"data: " + self.snapshot_json() + b"\n\n"
            time.sleep(self.refresh_s)

    def add_routes(self, http: HttpServer) -> None:
        http.route("/", lambda _: Response(body=PAGE.encode(), content_type="text/html; charset=utf-8"))
        http.route("/status.json", lambda _: Response(body=self.snapshot_json(), content_type="application/json"))
        http.route("/reject.jpg", self._reject_response)
        http.route(
            "/events",
            lambda _: Response(
                content_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                stream=self.events(),
            ),
        )

    def _reject_response(self, _request: Any) -> Response:
        jpeg = self._reject_jpeg
        if jpeg is None:
            return Response(404, b"no reject yet\n")
        return Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>inspectd</title>
<style>
 body{margin:0;background:#111;color:#eee;font:18px/1.3 system-ui,sans-serif}
 header{display:flex;justify-content:space-between;padding:8px 16px;background:#222;font-size:20px}
 #conn.bad{color:#f55}
 main{display:grid;grid-template-columns:minmax(320px,1fr) minmax(320px,1fr);gap:16px;padding:16px}
 #state{font-size:120px;font-weight:800;text-align:center;border-radius:16px;padding:24px 8px;letter-spacing:4px}
 .PASS{background:#1b7a2e}.REJECT{background:#b3161b}.IDLE{background:#444}
 #why{font-size:28px;text-align:center;margin-top:8px;min-height:36px}
 table{border-collapse:collapse;width:100%} td,th{padding:4px 8px;text-align:right}
 th{color:#aaa;font-weight:500} td:first-child,th:first-child{text-align:left}
 .big td{font-size:34px;font-weight:700} .ok{color:#5d5} .ng{color:#f66} .warn{color:#fc3}
 .card{background:#1c1c1c;border-radius:12px;padding:12px}
 h2{margin:0 0 8px;font-size:18px;color:#aaa;font-weight:500}
 #thumb{width:100%;max-height:60vh;object-fit:contain;background:#000;border-radius:8px}
 #recent td{font-size:16px}
 #alarm{background:#b3161b;font-size:30px;font-weight:700;padding:12px 16px;text-align:center}
</style></head><body>
<header><span>inspectd &middot; model <b id="model">-</b> <span id="age"></span></span>
<span>health <b id="health">-</b> &middot; <span id="conn">connecting</span></span></header>
<div id="alarm" hidden></div>
<main>
<section>
 <div id="state" class="IDLE">&ndash;</div><div id="why"></div>
 <div class="card" style="margin-top:16px"><h2>Counters</h2>
  <table class="big"><tr><th></th><th>pass</th><th>reject</th><th>errors</th><th>reject rate</th></tr>
   <tr id="shiftrow"><td id="shiftlabel">shift</td><td class="ok" id="s_pass">0</td><td class="ng" id="s_reject">0</td>
    <td class="warn" id="s_errors">0</td><td id="s_rate">0 %</td></tr>
   <tr><td>since start</td><td class="ok" id="t_pass">0</td><td class="ng" id="t_reject">0</td>
    <td class="warn" id="t_errors">0</td><td id="t_rate">0 %</td></tr></table>
  <div id="reasons" style="margin-top:8px"></div></div>
 <div class="card" style="margin-top:16px"><h2>Performance</h2>
  <table class="big"><tr><th>parts/s</th><th>latency p50</th><th>p99</th><th>cycle</th></tr>
   <tr><td id="rate">0</td><td id="p50">-</td><td id="p99">-</td><td id="cycle">-</td></tr></table></div>
</section>
<section>
 <div class="card"><h2>Latest reject <span id="rinfo"></span></h2>
  <img id="thumb" alt="no reject yet"></div>
 <div class="card" style="margin-top:16px"><h2>Last decisions</h2>
  <table id="recent"><thead><tr><th>time</th><th>frame</th><th>part</th><th>verdict</th><th>reason</th>
  <th>score</th><th>ms</th></tr></thead><tbody></tbody></table></div>
</section></main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let imgVersion = null, lastMsg = 0;
function pct(x){ return (100 * x).toFixed(1) + " %"; }
function text(id, v){ const e = $(id); const s = String(v); if (e.textContent !== s) e.textContent = s; }
function tally(p, t){ text(p+"_pass", t.pass); text(p+"_reject", t.reject); text(p+"_errors", t.errors);
  text(p+"_rate", pct(t.reject_rate)); }
function age(s){ if (s === null) return ""; if (s < 120) return "loaded " + s + " s ago";
  if (s < 7200) return "loaded " + Math.round(s/60) + " min ago"; return "loaded " + (s/3600).toFixed(1) + " h ago"; }
function render(s){
  const st = $("state"); st.className = s.state; text("state", s.state);
  text("why", s.latest ? (s.latest.reason + " · frame " + s.latest.frame_id +
       (s.latest.part_id !== null ? " · part " + s.latest.part_id : "")) : "waiting for parts");
  tally("s", s.shift); tally("t", s.total);
  text("shiftlabel", "shift since " + s.shift.since.slice(11, 16));
  $("shiftrow").style.display = s.shift.configured ? "" : "none";
  text("reasons", Object.entries(s.total.reasons).map(([k, v]) => k + " " + v).join(" · "));
  text("rate", s.throughput_hz.toFixed(1));
  const lat = s.latency_ms, cyc = lat.cycle;
  text("p50", lat.p50 === null ? "-" : lat.p50 + " ms"); text("p99", lat.p99 === null ? "-" : lat.p99 + " ms");
  text("cycle", cyc + " ms"); $("p99").className = lat.p99 !== null && lat.p99 > cyc ? "ng" : "";
  text("model", s.model.id || "loading"); text("age", age(s.model.age_s));
  const h = s.health || {}; text("health", h.summary || "-"); $("health").className = h.ok ? "ok" : "ng";
  $("alarm").hidden = h.ok !== false; if (h.ok === false) text("alarm", h.summary);
  const r = s.reject_image;
  if (r && r.version !== imgVersion) { imgVersion = r.version; $("thumb").src = "/reject.jpg?v=" + r.version;
    text("rinfo", "· frame " + r.frame_id + " · " + r.reason + (r.score !== null ? " · score " + r.score : "")); }
  const rows = s.recent.map((d) => "<tr><td>" + d.time + "</td><td>" + esc(d.frame_id) + "</td><td>" +
    esc(d.part_id === null ? "" : d.part_id) + "</td><td class='" + (d.verdict === "pass" ? "ok" : "ng") + "'>" +
    d.verdict + "</td><td>" + d.reason + "</td><td>" + (d.score === null ? "" : d.score) + "</td><td>" +
    d.latency_ms + "</td></tr>").join("");
  const body = document.querySelector("#recent tbody"); if (body.innerHTML !== rows) body.innerHTML = rows;
}
function esc(v){ return String(v).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
function connect(){
  const es = new EventSource("/events");
  es.onmessage = (e) => {
    lastMsg = Date.now(); text("conn", "live"); $("conn").className = ""; render(JSON.parse(e.data)); };
  es.onerror = () => { text("conn", "reconnecting"); $("conn").className = "bad"; };
}
setInterval(() => { if (Date.now() - lastMsg > 6000) { text("conn", "no data"); $("conn").className = "bad"; } }, 1000);
connect();
</script></body></html>
"""
