"""lm-evaluation-harness through the server, without lm-eval: the requests lm-eval 0.4.13's `local-completions`
sent to `qiusuo serve` (tests/fixtures/lm_eval/requests.jsonl, made by record.py there: loglikelihood and
generate_until, token ids and text, batch sizes 1 and 4) are replayed byte for byte against a live server on a
tiny model, parsed as lm-eval parses them, and compared item for item, and as task scores, with what lm-eval's
`hf` model computes: transformers' own forward on the same exported folder."""

import functools
import json
from pathlib import Path

import httpx
import pytest
import torch

import qiusuo
from qiusuo.infer import Engine
from qiusuo.infer.server import create_app, serve_in_thread

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
RECORDS = [json.loads(line) for line in (FIXTURES / "requests.jsonl").read_text().splitlines()]
MODES = ["tokens-bs1", "tokens-bs4", "text-bs1", "text-bs4"]
MC = [json.loads(line) for line in (FIXTURES / "mc.jsonl").read_text().splitlines()]
GEN = [json.loads(line) for line in (FIXTURES / "gen.jsonl").read_text().splitlines()]
MARGIN = 1e-4  # the references decide nothing by less; two correct forwards differ by ~1e-6 per logit here


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The model record.py recorded against (`build_model`): tiny, initializer_range 0.2 (clear preferences),
    seed 0, on the fixture's tokenizer, exported as a Hugging Face folder."""
    tok = qiusuo.load_tokenizer(FIXTURES)
    cfg = qiusuo.get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0, initializer_range=0.2,
                            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    return qiusuo.save_hf(qiusuo.Transformer(cfg), tmp_path_factory.mktemp("lm_eval") / "model", tokenizer=tok,
                          progress=False)


@pytest.fixture(scope="module")
def url(folder):
    engine = Engine(qiusuo.load_model(folder, progress=False), qiusuo.load_tokenizer(folder), max_batch=16)
    server, url = serve_in_thread(create_app(engine, "tiny"))
    yield url
    server.should_exit = True
    engine.shutdown()


@pytest.fixture(scope="module")
def hf(folder):
    return (transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(folder))


# ---- as lm-eval 0.4.13 parses responses (lm_eval/models/openai_completions.py, LocalCompletionsAPI) ----

def parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops))))
    return res


def parse_generations(out: dict) -> list[str]:
    texts = [None] * len(out["choices"])
    for c in out["choices"]:
        texts[c["index"]] = c["text"]
    return texts


# ---- as lm-eval's `hf` model computes them (lm_eval/models/huggingface.py), on transformers' forward ----

@functools.lru_cache(maxsize=None)  # the four modes score the same items
def reference_loglikelihood(model, tokens: tuple[int, ...], ctxlen: int) -> tuple[float, bool, float]:
    """The continuation's summed logprob, whether it is the greedy one, and the smallest top-1 vs top-2 logit gap
    over its positions (for `MARGIN`)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0, ctxlen - 1:].float()  # (continuation, V)
    cont = torch.tensor(tokens[ctxlen:])  # (continuation,)
    top2 = logits.topk(2, -1).values
    lp = logits.log_softmax(-1)
    return (lp.gather(1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()),
            (top2[:, 0] - top2[:, 1]).min().item())


@functools.lru_cache(maxsize=None)
def reference_generation(model, tok, ids: tuple[int, ...], max_tokens: int, stop: tuple[str, ...]) -> tuple[str, float]:
    """Greedy continuation to EOS or max_tokens, decoded without control tokens and cut at the first stop string;
    and the smallest top-1 vs top-2 logit gap among the steps that made the returned text."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    # the steps that made the text (the first one past it was still chosen by a clear margin)
    lengths = [len(tok.decode(new[: i + 1], skip_special_tokens=True)) for i in range(len(new))]
    steps = next((i + 1 for i, n in enumerate(lengths) if n > len(text)), len(new))
    gaps = [(lambda v: (v[0] - v[1]).item())(s[0].topk(2).values) for s in out.scores[:steps]]
    return text, min(gaps)


def scores(ll: dict, gen: dict) -> dict[str, float]:
    """acc, acc_norm (loglikelihood per character, as lm-eval normalises) and exact_match of the two tasks."""
    acc = norm = 0
    for d, doc in enumerate(MC):
        lls = [ll[d, c] for c in range(len(doc["choices"]))]
        acc += max(range(len(lls)), key=lambda c: lls[c]) == doc["gold"]
        norm += max(range(len(lls)), key=lambda c: lls[c] / len(doc["choices"][c])) == doc["gold"]
    em = sum(gen[d] == doc["target"] for d, doc in enumerate(GEN))
    return {"acc": acc / len(MC), "acc_norm": norm / len(MC), "exact_match": em / len(GEN)}


def item_of_loglikelihood(key: list[str]) -> tuple[int, int]:
    """(doc, choice) of lm-eval's (context, continuation) key; the task puts a space between them."""
    d = next(i for i, doc in enumerate(MC) if doc["context"] == key[0])
    return d, MC[d]["choices"].index(key[1].removeprefix(" "))


def item_of_generation(prompt, tok) -> int:
    text = prompt if isinstance(prompt, str) else tok.decode(prompt)
    return next(i for i, doc in enumerate(GEN) if doc["context"] == text)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_lm_eval_requests_score_as_transformers(url, hf, mode):
    model, tok = hf
    records = [r for r in RECORDS if r["mode"] == mode]
    ours_ll, ref_ll, ours_gen, ref_gen = {}, {}, {}, {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for rec in records:
            body = rec["body"]
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            assert [c["index"] for c in out["choices"]] == list(range(len(prompts)))
            if body.get("echo"):  # loglikelihood
                tokens = rec.get("tokens", body["prompt"])
                for c, ids in zip(out["choices"], tokens):  # the server scored lm-eval's tokens, then generated one
                    assert len(c["logprobs"]["tokens"]) == len(ids) + 1 and c["logprobs"]["token_logprobs"][0] is None
                parsed = parse_logprobs(out, rec["ctxlens"])
                for key, ids, ctxlen, got in zip(rec["keys"], tokens, rec["ctxlens"], parsed):
                    item = item_of_loglikelihood(key)
                    ll, greedy, gap = reference_loglikelihood(model, tuple(ids), ctxlen)
                    assert gap >= MARGIN or not greedy, f"{mode} {item}: a near-tie in the reference"
                    assert got[0] == pytest.approx(ll, abs=1e-4) and got[1] == greedy, (mode, item)
                    ours_ll[item], ref_ll[item] = got[0], ll
            else:  # generate_until
                for prompt, text in zip(prompts, parse_generations(out)):
                    d = item_of_generation(prompt, tok)
                    ids = prompt if isinstance(prompt, list) else tok(prompt, add_special_tokens=False).input_ids
                    ref, gap = reference_generation(model, tok, tuple(ids), body["max_tokens"], tuple(body["stop"]))
                    assert gap >= MARGIN, f"{mode} doc {d}: a near-tie in the reference"
                    assert text.split("\n")[0] == ref, (mode, d)  # lm-eval cuts at `until` too
                    ours_gen[d], ref_gen[d] = text.split("\n")[0], ref
    assert len(ours_ll) == sum(len(doc["choices"]) for doc in MC) and len(ours_gen) == len(GEN)  # every item
    lls = sorted(ref_ll.items())
    for d, doc in enumerate(MC):  # no choice wins by a near-tie, so acc compares like for like
        vals = sorted(v for (dd, _), v in lls if dd == d)
        assert vals[-1] - vals[-2] >= MARGIN
    assert scores(ours_ll, ours_gen) == scores(ref_ll, ref_gen)
