"""`qiusuo bench speculative`: MTP speculative decoding against plain decoding in the same run: the same engine
settings, model, prompts and greedy outputs (asserted equal), at each batch size, eager and with the compiled
step. Prints decode tokens/s of both and their ratio, the acceptance rate per draft position and the tokens each
verified step emitted.

Prompts are windows of the validation split of the default corpus (the stdlib's source, split as `qiusuo
prepare` splits it) in the model's own tokenizer with `--model DIR`, so a trained model drafts on the kind of
text it learned; random ids for a random `--preset` model (whose MTP module is random too: the floor, where
nearly every draft is rejected and speculation costs its verification and drafting for nothing).
"""

from __future__ import annotations

import argparse

import torch

from qiusuo.bench.common import add_device_args, add_model_args, load_tokenizer, setup
from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer
from qiusuo.runtime import device_sync, median_time


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_device_args(p)
    p.set_defaults(preset="demo")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per sequence")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2], help="K values to compare")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median reported)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled step (compiling each shape takes "
                   "tens of seconds on a CPU, outside the timing)")


def _model(args: argparse.Namespace, device: torch.device) -> Transformer:
    if args.model:
        from qiusuo.hf.load import load_model

        model = load_model(args.model, dtype=args.dtype, device=device)
        if not model.cfg.num_nextn_predict_layers:
            raise ValueError(f"{args.model} has no MTP module to draft with (num_nextn_predict_layers = 0)")
        return model.eval()
    torch.manual_seed(0)
    cfg = get_config(args.preset)
    return Transformer(get_config(args.preset, num_nextn_predict_layers=max(1, cfg.num_nextn_predict_layers))).to(
        device).eval()


def corpus_prompts(tok, n: int, length: int) -> list[list[int]]:
    """`n` windows of `length` tokens from the default corpus's validation documents, spread over them."""
    from qiusuo.data.sources import iter_documents, split_documents

    _, val = split_documents(list(iter_documents()), 0.02)
    ids = [t for d in val[: 4 * n] for t in tok.encode(d.text)]
    if len(ids) < n * length:
        raise ValueError(f"the validation documents hold {len(ids)} tokens, fewer than {n} prompts of {length}")
    step = len(ids) // n
    return [ids[i * step: i * step + length] for i in range(n)]


def run(args: argparse.Namespace) -> dict[str, float]:
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams
    from qiusuo.infer.speculative import Counters

    device = setup(args)
    model, tok = _model(args, device), load_tokenizer(args)
    L, new = args.prompt_len, args.new_tokens
    rounds = args.repeats + 1  # prompts differ per run (the warm-up included): no prefix-cache hits
    pool = (corpus_prompts(tok, rounds * max(args.batch), L) if args.model else
            torch.randint(0, model.cfg.vocab_size, (rounds * max(args.batch), L)).tolist())
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    print(f"device {device}, {args.dtype}, {args.model or args.preset + ' (random weights)'}: prompt {L} + {new} "
          f"new tokens, greedy; plain decoding is the reference", flush=True)
    results: dict[str, float] = {}
    for compiled in [False] + [True] * (not args.no_compile):
        make = {"plain": dict()} | {f"K={k}": dict(speculative="mtp", draft_tokens=k) for k in args.draft_tokens}
        engines = {who: Engine(model, tok, max_batch=max(args.batch), max_model_len=L + new, compile=compiled, **kw)
                   for who, kw in make.items()}
        mode = "compiled" if compiled else "eager"
        for B in args.batch:
            outs: dict[str, list] = {}
            for who, eng in engines.items():
                turn = iter(range(rounds))

                def once(eng=eng, who=who) -> None:
                    r = next(turn)
                    got = eng.generate(pool[r * B:(r + 1) * B], params)
                    outs.setdefault(who, []).append([o.outputs[0].token_ids for o in got])

                eng.runner.counters = Counters(eng.runner.K)
                t = median_time(once, repeats=args.repeats, warmup=1, sync=device_sync(device))
                key = f"{mode}/{who}/{B}"
                results[key] = B * new / t
                extra = ""
                if eng.runner.K:
                    s = eng.speculation
                    results[key + "/tokens_per_step"] = s["tokens_per_step"]
                    per = " ".join(f"{s[f'acceptance_rate_{j + 1}']:.2f}" for j in range(eng.runner.K))
                    extra = (f"  {results[key] / results[f'{mode}/plain/{B}']:.2f}x plain; accepted {per} by "
                             f"position, {s['tokens_per_step']:.2f} tokens/step")
                print(f"{mode:8s} batch {B:3d}  {who:6s} {results[key]:8.1f} tokens/s{extra}", flush=True)
            for who, o in outs.items():
                assert o == outs["plain"], f"{who}: speculative greedy output differs from plain decoding"
    return results
