"""Prometheus text metrics: requests, tokens, time to first token, tokens/s, queue depth."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.ttft_sum: dict[str, float] = defaultdict(float)
        self.ttft_count: dict[str, int] = defaultdict(int)
        self.tps_last: dict[str, float] = {}

    def request(self, route: str, model: str, status: int) -> None:
        with self._lock:
            self.requests[(route, model, status)] += 1

    def generation(self, model: str, last: Any) -> None:
        if last is None or last.usage is None:
            return
        with self._lock:
            self.prompt_tokens[model] += last.usage.prompt_tokens
            self.completion_tokens[model] += last.usage.completion_tokens
            if last.timings is not None:
                self.ttft_sum[model] += last.timings.prompt_seconds
                self.ttft_count[model] += 1
                self.tps_last[model] = last.timings.tokens_per_second(last.usage.completion_tokens)

    def render(self, registry: Any) -> str:
        out = ["# HELP edgelm_requests_total HTTP requests by route, model and status.",
               "# TYPE edgelm_requests_total counter"]
        with self._lock:
            for (route, model, status), n in sorted(self.requests.items()):
                out.append(f'edgelm_requests_total{{route="{route}",model="{model}",status="{status}"}} {n}')
            for name, table, kind in (("edgelm_prompt_tokens_total", self.prompt_tokens, "counter"),
                                      ("edgelm_completion_tokens_total", self.completion_tokens, "counter"),
                                      ("edgelm_time_to_first_token_seconds_sum", self.ttft_sum, "counter"),
                                      ("edgelm_time_to_first_token_seconds_count", self.ttft_count, "counter"),
                                      ("edgelm_tokens_per_second", self.tps_last, "gauge")):
                out.append(f"# TYPE {name} {kind}")
                out += [f'{name}{{model="{m}"}} {v}' for m, v in sorted(table.items())]
        gauges = {
            "edgelm_queue_depth": "requests in flight (waiting or generating)",
            "edgelm_model_loaded": "1 while the model is loaded",
            "edgelm_active_sequences": "sequences generating now",
            "edgelm_waiting_requests": "requests waiting for a free sequence",
            "edgelm_sequence_slots": "sequences the model generates at the same time (parallel)",
            "edgelm_batch_tokens": "tokens in the last decoded batch",
            "edgelm_generation_tokens_per_second": "tokens generated per second, all sequences, last 10 s",
        }
        rows: dict[str, list[str]] = {name: [] for name in gauges}
        for e in registry.entries.values():
            label = f'{{model="{e.name}"}}'
            rows["edgelm_queue_depth"].append(f"{label} {e.users}")
            model = e.model
            rows["edgelm_model_loaded"].append(f"{label} {int(model is not None)}")
            if model is None or model.closed:
                continue
            seqs = model.stats().get("sequences", {})
            for name, key in (("edgelm_active_sequences", "active"), ("edgelm_waiting_requests", "waiting"),
                              ("edgelm_sequence_slots", "slots"), ("edgelm_batch_tokens", "last_batch"),
                              ("edgelm_generation_tokens_per_second", "tokens_per_second")):
                rows[name].append(f"{label} {seqs.get(key, 0)}")
        for name, help_text in gauges.items():
            out += [f"# HELP {name} {help_text}.", f"# TYPE {name} gauge"] + [name + row for row in rows[name]]
        return "\n".join(out) + "\n"
