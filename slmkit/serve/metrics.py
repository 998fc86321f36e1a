"""The server's counters in Prometheus' text format (``GET /metrics``), kept without a client library."""

from __future__ import annotations

import threading
from collections import Counter

# Upper bounds (seconds) of the time-to-first-token histogram's buckets.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters, gauges and one histogram, updated from the HTTP handlers and the engine's worker
    (under a lock) and rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0
        self.steps = 0  # passes of the model: a prefill chunk or a decode step of the whole batch
        self.queue_depth = 0  # requests waiting for a place in the batch
        self.running = 0  # sequences in the decode batch
        self.running_requests = 0  # requests admitted and not finished
        self.prefix_hit_tokens = 0  # prompt tokens whose keys and values the prefix cache had (not run)
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_bytes = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add(self, **amounts: int) -> None:
        """Add to counters by name: ``add(generation_tokens=3)``."""
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def set(self, **values: int) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def engine_counters(self) -> dict[str, int | float | list[int]]:
        """Every value but the requests' (the engine's side: the process engine's child sends them)."""
        with self._lock:
            return {name: list(value) if isinstance(value, list) else value for name, value in vars(self).items()
                    if name not in ("_lock", "requests")}

    def first_token(self, seconds: float) -> None:
        with self._lock:
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_count += 1

    def render(self) -> str:
        """The Prometheus exposition text."""
        with self._lock:
            out = ["# HELP slm_requests_total HTTP requests answered, by endpoint and status.",
                   "# TYPE slm_requests_total counter"]
            out += [f'slm_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            for name, kind, value, help_text in (
                ("slm_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens prefilled."),
                ("slm_generation_tokens_total", "counter", self.generation_tokens, "Tokens generated."),
                ("slm_requests_cancelled_total", "counter", self.cancelled, "Requests cancelled (client gone)."),
                ("slm_engine_steps_total", "counter", self.steps,
                 "Passes of the model: a prefill chunk or a decode step of the whole batch."),
                ("slm_queue_depth", "gauge", self.queue_depth, "Requests waiting for a place in the batch."),
                ("slm_batch_size", "gauge", self.running, "Sequences in the running decode batch."),
                ("slm_requests_running", "gauge", self.running_requests, "Requests being prefilled or decoded."),
                ("slm_prefix_cache_queries_total", "counter", self.prefix_query_tokens,
                 "Prompt tokens looked up in the prefix cache (0 with --prefix-cache-mb 0)."),
                ("slm_prefix_cache_hits_total", "counter", self.prefix_hit_tokens,
                 "Prompt tokens whose keys and values came from the prefix cache instead of the model."),
                ("slm_prefix_cache_bytes", "gauge", self.prefix_cache_bytes, "Bytes of keys and values in the prefix cache."),
            ):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            out += ["# HELP slm_time_to_first_token_seconds Time from a request's arrival to its first token.",
                    "# TYPE slm_time_to_first_token_seconds histogram"]
            out += [f'slm_time_to_first_token_seconds_bucket{{le="{b}"}} {c}' for b, c in zip(TTFT_BUCKETS, self.ttft_counts)]
            out += [f'slm_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                    f"slm_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                    f"slm_time_to_first_token_seconds_count {self.ttft_count}"]
            return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, float]:
    """Prometheus text back into ``{"name{labels}": value}`` (for tests and the benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
