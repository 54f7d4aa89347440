"""The engine's prompt scoring (`SamplingParams.prompt_logprobs`, `ModelRunner.score`): batched, in pieces, over
every cache kind, held against each prompt's own full forward; requests that ask for it generate what they would
without it; an abort or a failure before it runs ends the request cleanly."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.infer.engine import Engine
from qiusuo.infer.sampling import SamplingParams
from engine_models import perturbed, prompts  # tests/infer/engine_models.py

LENGTHS = (1, 3, 9, 20, 37, 2)


def kinds(tok):
    """A model per cache kind: MLA's latent, V3.2's sparse latent with its indexer keys, V4's windows and pools."""
    return {
        "v3": perturbed(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)),
        "v32": perturbed(get_config("tiny", model_type="deepseek_v32", vocab_size=tok.vocab_size,
                                    num_nextn_predict_layers=0, index_n_heads=16, index_head_dim=16, index_topk=8)),
        "v4": perturbed(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                   index_n_heads=16)),
    }


@pytest.mark.parametrize("kind", ["v3", "v32", "v4"])
def test_scores_equal_the_full_forward(tok, kind):
    """max_prefill_tokens 8: prompts batched by rows x longest <= 8, and those longer than 8 scored alone in
    pieces of 8 positions, the cache carrying the context; every logprob, rank and top-3 list equals the one of
    the prompt's own full forward."""
    model = kinds(tok)[kind]
    engine = Engine(model, tok, max_batch=8, block_size=4, max_prefill_tokens=8, max_model_len=128)
    ps = prompts(tok, LENGTHS, seed=1)
    outs = engine.generate(ps, SamplingParams(max_tokens=0, prompt_logprobs=3))
    for p, out in zip(ps, outs):
        got = out.prompt_logprobs
        with torch.no_grad():
            lp = model(torch.tensor([p]))[0].float().log_softmax(-1)  # (T, V)
        ref = [lp[t, p[t + 1]].item() for t in range(len(p) - 1)]
        assert got.logprobs[0] is None and got.ranks[0] is None and got.top[0] is None and len(got.logprobs) == len(p)
        assert got.logprobs[1:] == pytest.approx(ref, abs=1e-5)
        assert got.ranks[1:] == [int((lp[t] > lp[t, p[t + 1]]).sum()) + 1 for t in range(len(p) - 1)]
        for t in range(len(p) - 1):
            values, ids = lp[t].topk(3)
            assert [v for _, v in got.top[t + 1]] == pytest.approx(values.tolist(), abs=1e-5)
        assert [c.text for c in out.outputs] == [""] and out.outputs[0].finish_reason == "length"
        assert out.usage.completion_tokens == 0
    assert engine.pool.used_blocks == 0  # scoring never touches the paged pool


def test_asking_for_scores_changes_nothing_generated(tok):
    model = kinds(tok)["v3"]
    engine = Engine(model, tok, max_batch=8, block_size=4, max_prefill_tokens=16)
    ps = prompts(tok, LENGTHS, seed=2)
    plain = engine.generate(ps, SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True, logprobs=1))
    scored = engine.generate(ps, SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True, logprobs=1,
                                                prompt_logprobs=0))
    for a, b in zip(plain, scored):
        assert a.prompt_logprobs is None and b.prompt_logprobs is not None
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-6)


def test_abort_before_scoring_ends_the_request(tok):
    engine = Engine(kinds(tok)["v3"], tok, max_batch=4, block_size=4)
    got = []
    rid = engine.submit(prompts(tok, (12,))[0], SamplingParams(max_tokens=5, prompt_logprobs=1), got.append)
    engine.abort(rid)  # in the same inbox drain as its arrival
    while engine.has_work():
        engine.step()
    assert [type(x).__name__ for x in got] == ["Usage"] and got[0].completion_tokens == 0
    assert engine.pool.used_blocks == 0 and not engine.scoring


def test_a_failed_scoring_step_fails_its_requests_and_the_engine_goes_on(tok, monkeypatch):
    engine = Engine(kinds(tok)["v3"], tok, max_batch=4, block_size=4)
    engine.start()
    try:
        def broken(*a, **kw):
            raise RuntimeError("scoring broke")

        with monkeypatch.context() as m:
            m.setattr(engine.runner, "score", broken)
            out = engine.generate([prompts(tok, (7,))[0]], SamplingParams(max_tokens=3, prompt_logprobs=0))[0]
        assert out.outputs[0].finish_reason == "error" and "scoring broke" in out.outputs[0].error
        ok = engine.generate([prompts(tok, (7,))[0]], SamplingParams(max_tokens=3, prompt_logprobs=0))[0]
        assert ok.outputs[0].finish_reason == "length" and ok.prompt_logprobs is not None
    finally:
        engine.shutdown()


def test_max_tokens_0_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
