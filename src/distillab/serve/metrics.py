"""serve's counters, as Prometheus metrics: each app has a `prometheus_client` registry of its own (two apps
in one process count apart), and GET /metrics answers it in Prometheus text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        self.requests = counter(
            "distillab_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "code")
        )
        self.prompt_tokens = counter("distillab_prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens = counter("distillab_completion_tokens_total", "Completion tokens generated.")
        # prompts the model actually computed; answers replayed from the idempotency store count apart
        self.answers = counter(
            "distillab_answers_total", "Prompts answered by the model (idempotent replays excluded)."
        )
        self.replays = counter("distillab_idempotent_replays_total", "Answers replayed for a repeated Idempotency-Key.")
        self.batches = counter("distillab_batches_total", "Model calls made by the batching loop.")
        self.batched_prompts = counter("distillab_batched_prompts_total", "Prompts over all batches.")
        self.faults = counter("distillab_faults_injected_total", "Injected faults by kind.", ("kind",))

    def render(self) -> bytes:
        """The Prometheus text of every counter."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 before it is first counted), e.g. value("distillab_faults_injected_total", kind="500")."""
        return self.registry.get_sample_value(name, labels) or 0.0
