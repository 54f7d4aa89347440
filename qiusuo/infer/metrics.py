"""`qiusuo serve`'s /metrics in Prometheus' text format: the HTTP side (requests in flight, responses by status,
disconnects, streams ended by an error) and the engine's (tokens, queue, cache blocks, prefix-cache hits,
speculative acceptance, time to first token). Reads counters that live where they are counted; keeps none.
"""

from __future__ import annotations

from qiusuo.infer.admission import ServerState

MEDIA_TYPE = "text/plain; version=0.0.4"


def prometheus_text(st: ServerState) -> str:
    """The server's counters (`ServerState`), and the engine's once it has loaded, as Prometheus text."""
    e = st.engine
    lines = []

    def put(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP qiusuo_{name} {help_}", f"# TYPE qiusuo_{name} {kind}", f"qiusuo_{name} {value}"])

    put("http_inflight_requests", "gauge", "requests admitted and not yet answered", st.inflight)
    lines += ["# HELP qiusuo_http_responses_total responses by HTTP status (streams count once, at their start)",
              "# TYPE qiusuo_http_responses_total counter"]
    lines += [f'qiusuo_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(st.responses.items())]
    put("http_disconnects_total", "counter", "requests whose client went away before the answer", st.disconnects)
    put("http_stream_errors_total", "counter", "streams ended by an error event", st.stream_errors)
    if e is not None:
        s = e.stats
        put("requests_total", "counter", "requests the engine accepted", s["requests"])
        put("prompt_tokens_total", "counter", "prompt tokens accepted", s["prompt_tokens"])
        put("generation_tokens_total", "counter", "tokens generated", s["generation_tokens"])
        put("sequences_aborted_total", "counter", "sequences stopped before their end", s["aborted"])
        put("sequences_failed_total", "counter", "sequences that failed (could not be sampled)", s["failed"])
        put("queue_depth", "gauge", "sequences waiting for a batch slot or cache blocks", len(e.waiting))
        put("running_sequences", "gauge", "sequences in the running batch", len(e.running))
        put("cache_blocks_used", "gauge", "latent cache blocks held by sequences", e.pool.used_blocks)
        put("cache_blocks_total", "gauge", "latent cache blocks in the pool", e.pool.num_blocks)
        put("cache_usage_ratio", "gauge", "fraction of cache blocks in use", e.pool.used_blocks / e.pool.num_blocks)
        put("prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
            e.pool.hit_tokens)
        if e.runner.K:  # speculative decoding
            c = e.runner.counters
            put("spec_verify_steps_total", "counter", "sequence-steps that verified drafts", c.steps)
            put("spec_emitted_tokens_total", "counter", "tokens those steps emitted", c.emitted)
            put("spec_mean_tokens_per_step", "gauge", "tokens emitted per verified sequence-step",
                c.emitted / max(c.steps, 1))
            lines += ["# HELP qiusuo_spec_acceptance_rate drafts accepted / drafted, by draft position",
                      "# TYPE qiusuo_spec_acceptance_rate gauge"]
            lines += [f'qiusuo_spec_acceptance_rate{{position="{j + 1}"}} {a / max(d, 1)}'
                      for j, (a, d) in enumerate(zip(c.accepted, c.drafted))]
        lines += ["# HELP qiusuo_time_to_first_token_seconds time from arrival to the first token",
                  "# TYPE qiusuo_time_to_first_token_seconds summary",
                  f"qiusuo_time_to_first_token_seconds_sum {s['ttft_sum']}",
                  f"qiusuo_time_to_first_token_seconds_count {s['ttft_count']}"]
    return "\n".join(lines) + "\n"
