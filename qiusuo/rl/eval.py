"""`qiusuo eval`: accuracy of a model on a built-in task's test split.

Greedy decoding (temperature 0) on the serving engine over distinct test questions, so the figure is
deterministic and comparable before and after training; also reports how many completions follow the R1 format.
"""

from __future__ import annotations

import argparse
import json
import sys

from qiusuo.rl.rewards import extract_answer, format_ok
from qiusuo.rl.tasks import chat_messages, check_answer, get_task


def evaluate(model, tokenizer, task, n: int = 200, seed: int = 0, max_tokens: int = 48, batch: int = 64,
             block_size: int = 4) -> dict:
    """{"accuracy", "format", "n"} over up to n distinct test problems (fewer when the split is smaller)."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams
    from qiusuo.rl.rollout import stop_token

    problems = task.problems("test", n, seed=seed, unique=True)
    prompts = [tokenizer.encode_chat(chat_messages(p, with_answer=False)) for p in problems]
    end = stop_token(tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=[end])
    engine = Engine(model, tokenizer, max_batch=batch, block_size=block_size,
                    max_model_len=max(len(p) for p in prompts) + max_tokens)
    texts = [r.outputs[0].text for r in engine.generate(prompts, params)]
    right = sum(check_answer(p, extract_answer(t)) for p, t in zip(problems, texts))
    return {"accuracy": right / len(problems), "format": sum(map(format_ok, texts)) / len(problems), "n": len(problems)}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder with its tokenizer")
    p.add_argument("--task", default="arithmetic", help="task spec, e.g. arithmetic:digits=2 or countdown:count=3")
    p.add_argument("--n", type=int, default=200, help="distinct test problems")
    p.add_argument("--seed", type=int, default=0, help="which test problems")
    p.add_argument("--max-tokens", type=int, default=48, help="max tokens per answer")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores)")


def main(args: argparse.Namespace) -> int:
    import torch

    from qiusuo.hf.load import load_model, load_tokenizer
    from qiusuo.runtime import set_threads

    set_threads(torch.device("cpu"), args.threads)
    try:
        task = get_task(args.task)
        model = load_model(args.model, progress=False)
        result = evaluate(model, load_tokenizer(args.model), task, args.n, args.seed, args.max_tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"qiusuo eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"task": args.task, **result}))
    return 0
