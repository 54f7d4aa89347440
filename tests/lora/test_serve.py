"""Serving several LoRA adapters over one base: requests for different adapters (and the base) share one batch and
each equals its adapter served alone; the prefix cache is kept per adapter; `qiusuo serve --lora NAME=DIR` lists
each adapter as a model and answers an unknown model name with a 404 in OpenAI's shape."""

import copy

import httpx
import pytest
import torch

from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.infer import Engine
from qiusuo.infer.sampling import SamplingParams
from qiusuo.infer.server import create_app, lora_args, serve_in_thread
from qiusuo.lora.apply import add_lora
from qiusuo.lora.layers import lora_layers
from qiusuo.lora.peft import attach, save_adapter
from qiusuo.model.transformer import Transformer

TEXTS = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b):\n    return a + b\n",
         "Continuous batching lets requests join and leave between steps. "] * 12
PROMPTS = ["The quick brown fox", "def add(a, b):", "Continuous batching lets", "The lazy dog"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a tiny base model and two peft adapters "a" and "b" on every family, saved."""
    root = tmp_path_factory.mktemp("adapters")
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    base = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)).eval()
    folders = {}
    for i, name in enumerate(("a", "b")):
        m = copy.deepcopy(base)
        add_lora(m, rank=2 + 2 * i, alpha=8, seed=i)  # different ranks: the bank pads them
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for layer in lora_layers(m):
                for _, _, B, _ in layer.pairs():
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)
        folders[name] = save_adapter(m, root / name)
    return tok, base, folders


def engine_of(setup, names, **kw):
    tok, base, folders = setup
    model = copy.deepcopy(base)
    served = attach(model, {n: folders[n] for n in names}) if names else []
    return Engine(model, tok, max_batch=8, block_size=4, adapters=served, **kw)


def test_adapters_in_one_batch_equal_each_served_alone(setup):
    engine = engine_of(setup, ["a", "b"])
    rows = []
    decode = engine.runner.decode
    engine.runner.decode = lambda seqs: rows.append(len(seqs)) or decode(seqs)
    which = ["a", "b", None, "b"]
    together = engine.generate(PROMPTS, GREEDY, adapters=which)
    assert max(rows) == 4  # one batch
    alone = {None: engine_of(setup, []), "a": engine_of(setup, ["a"]), "b": engine_of(setup, ["b"])}
    for prompt, name, got in zip(PROMPTS, which, together):
        want = alone[name].generate([prompt], GREEDY, adapters=[name] if name else None)[0].outputs[0]
        assert got.outputs[0].token_ids == want.token_ids, name
        assert got.outputs[0].logprobs == pytest.approx(want.logprobs, abs=1e-4)
    base = alone[None].generate(PROMPTS[:2], GREEDY)
    assert base[0].outputs[0].token_ids != together[0].outputs[0].token_ids  # the adapters change the text
    assert base[1].outputs[0].token_ids != together[1].outputs[0].token_ids


def test_prefix_cache_is_kept_per_adapter(setup):
    engine = engine_of(setup, ["a", "b"])
    prompt = " ".join(PROMPTS) * 2
    params = SamplingParams(max_tokens=2, temperature=0)

    def cached(name):
        return engine.generate([prompt], params, adapters=[name])[0].usage.cached_tokens

    assert cached("a") == 0
    assert cached("b") == 0 and cached(None) == 0  # another adapter's latents are not this one's
    assert cached("a") > 0 and cached("b") > 0 and cached(None) > 0


def test_each_adapter_is_a_model_and_an_unknown_name_is_a_404(setup):
    engine = engine_of(setup, ["a", "b"])
    srv, url = serve_in_thread(create_app(engine, "base"))
    try:
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        assert ids == ["base", "a", "b"]
        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = {m: httpx.post(f"{url}/v1/completions", json={**body, "model": m}, timeout=60).json()
               for m in ("a", "base")}
        assert got["a"]["model"] == "a"
        raw = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, skip_special_tokens=True,
                             stop_at_turn_end=False)  # what /v1/completions asks of the engine
        want = engine.generate([PROMPTS[0]], raw, adapters=["a"])[0].outputs[0].text
        assert got["a"]["choices"][0]["text"] == want != got["base"]["choices"][0]["text"]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"model": "c", "messages": [{"role": "user", "content": "hi"}]})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        assert "'c' does not exist" in err["message"] and "'a'" in err["message"]
    finally:
        srv.should_exit = True
        engine.shutdown()


def test_lora_options_are_checked_before_loading(setup, tmp_path):
    folders = setup[2]
    assert lora_args([f"a={folders['a']}"], "base") == {"a": str(folders["a"])}
    for spec, message in ((str(folders["a"]), "NAME=DIR"), (f"base={folders['a']}", "is taken"),
                          (f"x={tmp_path}", "no adapter_config.json")):
        with pytest.raises(ValueError, match=message):
            lora_args([spec], "base")
    with pytest.raises(ValueError, match="is taken"):
        lora_args([f"a={folders['a']}", f"a={folders['b']}"], "base")


def test_an_engine_over_a_training_model_runs_its_adapter(setup):
    """GRPO's rollouts and a run's samples: an Engine given no adapter names runs the model as it is, its one
    adapter included, as the merged model does."""
    from qiusuo.lora.peft import merge_adapter

    tok, base, folders = setup
    model = copy.deepcopy(base)
    attach(model, {"a": folders["a"]})
    merged = merge_adapter(copy.deepcopy(base), folders["a"])
    got = Engine(model, tok, max_batch=4, block_size=4).generate(PROMPTS[:2], GREEDY)
    want = Engine(merged, tok, max_batch=4, block_size=4).generate(PROMPTS[:2], GREEDY)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == pytest.approx(w.outputs[0].logprobs, abs=1e-4)
