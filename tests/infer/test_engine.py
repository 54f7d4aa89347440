"""The engine against slow references: one-at-a-time generation, prefix-cache misses, eager decoding; per-request
sampling streams, stop strings and tokens, streamed text. (The paged cache: test_paged.py; the filters:
test_sampling.py; detokenisation: test_output.py; admission: test_scheduler.py.)"""

import pytest
import torch

from qiusuo.infer import Engine, SamplingParams

PROMPTS = ["The quick brown fox", "Hello world, héllo wörld 你好", "def add(a, b):\n    return",
           "Continuous batching lets requests join and leave", "x", "The lazy dog. The quick brown fox jumps over"]


def test_batched_greedy_equals_one_at_a_time(model, tok):
    """Continuous batching (3 slots for 6 prompts of different lengths, rows joining and leaving) gives exactly
    the tokens of `model.generate` run on each prompt alone."""
    eng = Engine(model, tok, max_batch=3, block_size=4)
    n = [7, 12, 5, 9, 11, 6]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in n]
    outs = eng.generate(PROMPTS, params)
    for p, k, o in zip(PROMPTS, n, outs):
        ids = torch.tensor([tok.encode(p)])
        ref = model.generate(ids, k)[0, ids.shape[1]:].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length" and o.usage.completion_tokens == k
    assert eng.pool.used_blocks == 0


def test_prefix_cache_hit_equals_miss_and_frees(model, tok):
    eng = Engine(model, tok, max_batch=4, block_size=4)
    prompt = PROMPTS[5]
    p = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    miss = eng.generate([prompt], p)[0]
    assert miss.usage.cached_tokens == 0 and eng.pool.used_blocks == 0
    hit = eng.generate([prompt], p)[0]
    assert hit.usage.cached_tokens >= 4 * ((len(tok.encode(prompt)) - 1) // 4)
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    assert torch.allclose(torch.tensor(hit.outputs[0].logprobs), torch.tensor(miss.outputs[0].logprobs), atol=1e-5)
    assert eng.pool.used_blocks == 0


def test_sampling_seed_is_batch_independent(model, tok):
    eng = Engine(model, tok, max_batch=8, block_size=4)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=2, ignore_eos=True)
    alone = eng.generate([PROMPTS[0]], p)[0]
    noise = SamplingParams(max_tokens=6, temperature=1.3, ignore_eos=True)
    crowded = eng.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [noise, p, noise])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowded.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # samples of one request differ


def test_stop_strings_and_streamed_text(model, tok):
    """Streamed pieces concatenate to the final text (no split UTF-8), and a stop string cuts the output."""
    eng = Engine(model, tok, max_batch=4, block_size=4)
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=1, ignore_eos=True)
    pieces = []
    full = eng.generate([PROMPTS[1]], p, progress=lambda d: pieces.append(d.text))[0].outputs[0]
    assert "".join(pieces) == full.text == tok.decode(full.token_ids)
    assert all("\ufffd" not in x or x == pieces[-1] for x in pieces[:-1]) or "\ufffd" in full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=1.0, seed=1, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]
    assert eng.pool.used_blocks == 0


def test_stop_token_and_bad_params(model, tok):
    eng = Engine(model, tok, max_batch=2, block_size=4)
    free = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0]
    stopped = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0,
                                                        stop_token_ids=[free.token_ids[2]]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:2]
    for bad in [dict(temperature=-1), dict(max_tokens=0), dict(top_p=0), dict(n=0), dict(logprobs=-2)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="context"):
        eng.generate(["hi"], SamplingParams(max_tokens=model.cfg.max_position_embeddings))


def test_compiled_engine_equals_eager(model, tok):
    """The compiled decoding step (rows padded 3 -> 4, context gathered to a fixed 64 slots, weights frozen in)
    gives the eager engine's greedy tokens and logprobs, and leaves no blocks behind."""
    prompts = PROMPTS[:3]  # ragged prompt lengths
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    eager = Engine(model, tok, max_batch=4, block_size=4).generate(prompts, params)
    eng = Engine(model, tok, max_batch=4, block_size=4, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = eng.generate(prompts, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    for a, b in zip(eager, compiled):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
    assert eng.pool.used_blocks == 0
