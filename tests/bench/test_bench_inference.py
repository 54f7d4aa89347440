"""The decoding and serving benchmarks run end to end on the tiny preset and count what they claim to count (no
timing is asserted: the numbers are printed by `qiusuo bench decode|engine|serve`)."""

import argparse
import math

import pytest
import torch

from qiusuo.bench import decode, serve


@pytest.fixture(autouse=True)
def _keep_threads():
    """`--threads` sets torch's process-wide thread count; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_serve_load_test_counts_every_token(capsys):
    """8 streamed requests over 4 concurrent clients against a live server: all finish, no errors, the usage
    totals add up to requests x new tokens, and every request yields a time to first token."""
    out = serve.run(_args(serve.add_args, ["--preset", "tiny", "--clients", "4", "--requests", "8",
                                           "--prompt-len", "12", "--new-tokens", "6", "--threads", "1"]))
    assert out["requests"] == 8 and out["errors"] == 0
    assert out["output_tokens_per_s"] > 0
    assert math.isfinite(out["ttft_p99_ms"]) and math.isfinite(out["itl_p50_ms"])
    assert "8 requests (0 errors)" in capsys.readouterr().out


@pytest.mark.slow
def test_engine_decode_bench_against_transformers(capsys):
    """The engine and transformers' generate both decode; the cache bytes printed equal the formula."""
    out = decode.run_engine(_args(decode.add_engine_args, ["--preset", "tiny", "--batch", "1", "2", "--prompt-len",
                                                           "8", "--new-tokens", "4", "--repeats", "1", "--threads",
                                                           "1", "--no-compile"]))
    assert set(out) == {f"{who}/{b}" for who in ("qiusuo engine", "transformers") for b in (1, 2)}
    assert all(v > 0 for v in out.values())
    text = capsys.readouterr().out
    assert "latent cache 192 bytes/token (formula 192)" in text  # tiny: 2 layers x (16 + 8) x 4 bytes
    assert "same weights" in text


def test_model_decode_bench_against_transformers(capsys):
    """`bench decode` (Transformer.generate over the contiguous cache) and transformers both decode, through the
    same timing loop as the engine; the cache bytes printed are the formula's."""
    out = decode.run_decode(_args(decode.add_decode_args, ["--preset", "tiny", "--batch", "1", "2", "--prompt-len",
                                                           "8", "--new-tokens", "4", "--repeats", "1", "--threads",
                                                           "1", "--no-compile"]))
    assert set(out) == {f"{who}/{b}" for who in ("qiusuo", "transformers") for b in (1, 2)}
    assert all(v > 0 for v in out.values())
    text = capsys.readouterr().out
    assert "cache 192 bytes/token" in text and "same weights" in text
    assert "batch   2  qiusuo / transformers:" in text


def test_speculative_bench_compares_with_plain_decoding(capsys):
    """Plain and speculative engines decode the same prompts (their greedy outputs asserted equal inside), and
    the acceptance figures are reported per draft position."""
    from qiusuo.bench import speculative

    out = speculative.run(_args(speculative.add_args, ["--preset", "tiny", "--batch", "1", "3", "--prompt-len", "8",
                                                       "--new-tokens", "6", "--draft-tokens", "2", "--repeats", "1",
                                                       "--no-compile", "--threads", "1"]))
    assert {"eager/plain/1", "eager/K=2/1", "eager/plain/3", "eager/K=2/3"} <= set(out)
    assert 1 <= out["eager/K=2/3/tokens_per_step"] <= 3
    assert "accepted" in capsys.readouterr().out


def test_context_bench_compares_the_cache_precisions_in_one_run(capsys):
    """`bench context --compare-cache`: both caches prefilled and decoded, interleaved, for each arm."""
    from qiusuo.bench import context

    out = context.run(_args(context.add_args, ["--contexts", "40", "--models", "V3", "V4", "--threads", "1",
                                               "--compare-cache", "--rounds", "3"]))
    assert set(out) == {f"{m}/40/{c}_decode_tok_s" for m in ("V3", "V4") for c in ("bf16", "fp8")} | {
        f"{m}/40/fp8_over_bf16{q}" for m in ("V3", "V4") for q in ("", "_q1", "_q3")}
    assert all(v > 0 for v in out.values())
    for m in ("V3", "V4"):
        assert out[f"{m}/40/fp8_over_bf16_q1"] <= out[f"{m}/40/fp8_over_bf16"] <= out[f"{m}/40/fp8_over_bf16_q3"]
    assert "V4 (v4-bench) context      40: decode bf16 cache" in capsys.readouterr().out
