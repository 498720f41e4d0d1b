"""Server metrics in the Prometheus text exposition format (version 0.0.4), written directly.

Requests by endpoint and status, request latency (a summary: 0.5 / 0.9 / 0.99 quantiles over the
last `window` requests of each endpoint, plus sum and count), batch sizes (a histogram of rows per
batch, and of adapters per batch), queue depth, and the adapter cache's hits, misses, evictions and
load / switch seconds. prometheus_client is not a dependency; the format is a few lines of text.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ADAPTER_BUCKETS = (1, 2, 4, 8, 16, 32)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return lines + [f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class ServerMetrics:
    """Counters kept by the app (requests) and the batcher (batches); `render` writes them out."""

    def __init__(self, window: int = 2048):
        self.window = window
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.latencies: dict[str, collections.deque[float]] = {}
        self.latency_sum: collections.Counter[str] = collections.Counter()
        self.latency_count: collections.Counter[str] = collections.Counter()
        self.batch_rows = _Histogram(ROW_BUCKETS)
        self.batch_adapters = _Histogram(ADAPTER_BUCKETS)
        self.batch_seconds = 0.0

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, method, status)] += 1
            self.latencies.setdefault(endpoint, collections.deque(maxlen=self.window)).append(seconds)
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def observe_batch(self, record) -> None:
        with self._lock:
            self.batch_rows.observe(record.rows)
            self.batch_adapters.observe(record.adapters)
            self.batch_seconds += record.seconds

    def render(self, queue_depth: int, max_queue: int, cache: dict[str, Any], info: dict[str, str]) -> str:
        with self._lock:
            lines = ["# HELP peftkit_info The served base model and batching mode.", "# TYPE peftkit_info gauge",
                     f"peftkit_info{_labels(**info)} 1"]
            lines += ["# HELP peftkit_requests_total HTTP requests answered, by endpoint, method and status.",
                      "# TYPE peftkit_requests_total counter"]
            for (endpoint, method, status), count in sorted(self.requests.items()):
                lines.append(f"peftkit_requests_total{_labels(endpoint=endpoint, method=method, status=status)} {count}")
            lines += ["# HELP peftkit_request_latency_seconds Time from request to the end of the response, by endpoint "
                      f"(quantiles over the last {self.window} requests).",
                      "# TYPE peftkit_request_latency_seconds summary"]
            for endpoint in sorted(self.latencies):
                values = sorted(self.latencies[endpoint])
                for q in (0.5, 0.9, 0.99):
                    lines.append(f"peftkit_request_latency_seconds{_labels(endpoint=endpoint, quantile=q)} {_quantile(values, q)}")
                lines.append(f"peftkit_request_latency_seconds_sum{_labels(endpoint=endpoint)} {self.latency_sum[endpoint]}")
                lines.append(f"peftkit_request_latency_seconds_count{_labels(endpoint=endpoint)} {self.latency_count[endpoint]}")
            lines += ["# HELP peftkit_batch_rows Rows (texts or prompts) per model batch.", "# TYPE peftkit_batch_rows histogram",
                      *self.batch_rows.lines("peftkit_batch_rows"),
                      "# HELP peftkit_batch_adapters Distinct adapters per model batch.",
                      "# TYPE peftkit_batch_adapters histogram", *self.batch_adapters.lines("peftkit_batch_adapters"),
                      "# HELP peftkit_batch_seconds_total Time the model spent running batches.",
                      "# TYPE peftkit_batch_seconds_total counter", f"peftkit_batch_seconds_total {self.batch_seconds}"]
        lines += ["# HELP peftkit_queue_depth Requests waiting for a batch.", "# TYPE peftkit_queue_depth gauge",
                  f"peftkit_queue_depth {queue_depth}",
                  "# HELP peftkit_queue_capacity Requests the queue holds before answering 503.",
                  "# TYPE peftkit_queue_capacity gauge", f"peftkit_queue_capacity {max_queue}"]
        counters = [
            ("adapter_cache_slot_hits_total", "counter", "Batches whose adapter was in a model slot already.", cache["slot_hits"]),
            ("adapter_cache_memory_hits_total", "counter", "Adapters copied into a slot from memory (no disk read).", cache["memory_hits"]),
            ("adapter_cache_misses_total", "counter", "Adapters read from disk.", cache["disk_loads"]),
            ("adapter_cache_slot_evictions_total", "counter", "Adapters removed from a slot to make room.", cache["slot_evictions"]),
            ("adapter_cache_memory_evictions_total", "counter", "Adapters dropped from memory to fit the byte budget.", cache["memory_evictions"]),
            ("adapter_cache_load_seconds_total", "counter", "Time reading adapters from disk.", cache["load_seconds_total"]),
            ("adapter_cache_switch_seconds_total", "counter", "Time copying adapters into slots.", cache["switch_seconds_total"]),
            ("adapter_cache_memory_bytes", "gauge", "Bytes of adapters kept in memory.", cache["memory_bytes"]),
            ("adapter_cache_budget_bytes", "gauge", "The memory tier's byte budget.", cache["byte_budget"]),
            ("adapter_cache_slots", "gauge", "Adapter slots in the model.", cache["capacity"]),
            ("adapter_cache_slots_used", "gauge", "Adapter slots holding an adapter.", len(cache["in_slots"])),
        ]
        for name, kind, help_text, value in counters:
            lines += [f"# HELP peftkit_{name} {help_text}", f"# TYPE peftkit_{name} {kind}", f"peftkit_{name} {value}"]
        return "\n".join(lines) + "\n"


class AdapterTraffic:
    """Per adapter: requests, rows, failures and the latency of its model work (from queueing to result),
    the last `window` latencies kept for quantiles. For the web page (GET /v1/dashboard)."""

    def __init__(self, window: int = 256):
        self.window = window
        self._lock = threading.Lock()
        self._counts: dict[str, list] = {}  # name -> [requests, rows, failed, seconds, deque of latencies]

    def observe(self, adapter: str, rows: int, seconds: float, ok: bool) -> None:
        with self._lock:
            entry = self._counts.setdefault(adapter, [0, 0, 0, 0.0, collections.deque(maxlen=self.window)])
            entry[0] += 1
            entry[1] += rows
            entry[2] += 0 if ok else 1
            entry[3] += seconds
            entry[4].append(seconds)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            out = {}
            for name, (requests, rows, failed, seconds, recent) in self._counts.items():
                ordered = sorted(recent)
                out[name] = {"requests": requests, "rows": rows, "failed": failed,
                             "mean_ms": round(1000 * seconds / requests, 2) if requests else None,
                             "p50_ms": round(1000 * _quantile(ordered, 0.5), 2), "p99_ms": round(1000 * _quantile(ordered, 0.99), 2)}
            return out
