"""Prometheus metrics of the server, in a registry of their own (several servers may live in one test process)."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. TTFT spans a cached short prompt on a GPU (ms) to a long prompt queued behind others on a CPU (tens of s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("tinyserve_requests_running", "Sequences holding a KV cache slot (prefilling or decoding)", registry=r)
        self.waiting = Gauge("tinyserve_requests_waiting", "Sequences queued for a KV cache slot", registry=r)
        self.slots = Gauge("tinyserve_kv_slots", "KV cache slots (concurrent sequences)", registry=r)
        self.prompt_tokens = Counter("tinyserve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.cached_tokens = Counter("tinyserve_prompt_tokens_cached", "Prompt tokens served by the prefix cache (not prefilled)",
                                     registry=r)
        self.prefix_host_bytes = Gauge("tinyserve_prefix_cache_host_bytes",
                                       "Host memory holding cached prefixes whose KV slots went to other prompts", registry=r)
        self.generation_tokens = Counter("tinyserve_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter("tinyserve_spec_draft_tokens", "Tokens proposed by speculative decoding", registry=r)
        self.accepted_tokens = Counter("tinyserve_spec_accepted_tokens", "Proposed tokens that verified", registry=r)
        self.ttft = Histogram("tinyserve_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tinyserve_time_per_output_token_seconds", "Time between consecutive tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)
        self.finished = Counter("tinyserve_sequences_finished", "Finished sequences by reason", ["reason"], registry=r)
        self.http = Counter("tinyserve_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.rejected = Counter("tinyserve_requests_rejected_queue_full", "Requests answered 429 (waiting queue full)", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
