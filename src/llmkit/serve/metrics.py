"""Server counters rendered in the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Thread-safe counters: requests by endpoint/status, tokens, time to first token, recent tokens/s."""

    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # last bucket is +Inf
        self.ttft_sum = 0.0
        self.window_s = window_s
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            for i, b in enumerate(TTFT_BUCKETS):
                if seconds <= b:
                    self.ttft_counts[i] += 1
                    break
            else:
                self.ttft_counts[-1] += 1

    def on_step(self, tokens: int, _seconds: float) -> None:
        """Engine hook, called after every decode step."""
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - self.window_s:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            n = sum(t for ts, t in self.recent if ts >= now - self.window_s)
        return n / self.window_s

    def render(self, queue_depth: int, running: int) -> str:
        """The /metrics page."""
        out = ["# HELP llmkit_requests_total HTTP requests by endpoint and status code.",
               "# TYPE llmkit_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'llmkit_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP llmkit_prompt_tokens_total Prompt tokens processed.",
                    "# TYPE llmkit_prompt_tokens_total counter", f"llmkit_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP llmkit_generation_tokens_total Tokens generated.",
                    "# TYPE llmkit_generation_tokens_total counter",
                    f"llmkit_generation_tokens_total {self.generation_tokens}",
                    "# HELP llmkit_time_to_first_token_seconds Time from request to first generated token.",
                    "# TYPE llmkit_time_to_first_token_seconds histogram"]
            cum = 0
            for b, n in zip(TTFT_BUCKETS, self.ttft_counts):
                cum += n
                out.append(f'llmkit_time_to_first_token_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.ttft_counts[-1]
            out += [f'llmkit_time_to_first_token_seconds_bucket{{le="+Inf"}} {cum}',
                    f"llmkit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                    f"llmkit_time_to_first_token_seconds_count {cum}"]
        out += ["# HELP llmkit_queue_depth Requests waiting for a batch slot.", "# TYPE llmkit_queue_depth gauge",
                f"llmkit_queue_depth {queue_depth}",
                "# HELP llmkit_running_requests Sequences in the running decode batch.",
                "# TYPE llmkit_running_requests gauge", f"llmkit_running_requests {running}",
                f"# HELP llmkit_tokens_per_second Generated tokens per second over the last {self.window_s:g} s.",
                "# TYPE llmkit_tokens_per_second gauge", f"llmkit_tokens_per_second {self.tokens_per_second():.3f}"]
        return "\n".join(out) + "\n"
