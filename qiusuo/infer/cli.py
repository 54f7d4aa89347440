"""`qiusuo generate` and `qiusuo chat`: the engine on the terminal.

Both commands live here and share their model options; `add_args` reads which one is being set up from the
parser's `prog` ("qiusuo generate" / "qiusuo chat"), since the command table maps a command to a module.
`chat` keeps the whole conversation and re-sends it each turn: the previous turn's prompt blocks are still in
the engine's prefix cache, so only the new tokens are prefilled (the cached count is shown after each reply).
"""

from __future__ import annotations

import argparse
import sys

import torch

from qiusuo.infer.engine import Delta, Engine
from qiusuo.infer.sampling import SamplingParams


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every engine-backed command shares (generate, chat, serve)."""
    p.add_argument("--model", required=True, help="model folder (Hugging Face layout: config.json, safetensors, tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; unset: cuda when available")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype; unset: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=16, help="tokens per latent cache block")
    p.add_argument("--cache-memory-mb", type=int, default=None,
                   help="latent cache budget in MiB; unset: every batch row at full context, at most 1024")
    p.add_argument("--max-model-len", type=int, default=None, help="context length; unset: the model's")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile: ~2x faster small batches "
                   "on a CPU, after tens of seconds of compiling per new batch shape")


def load_engine(args: argparse.Namespace, max_batch: int = 32) -> Engine:
    """Model, tokenizer and engine from the command's options (qiusuo.hf is imported only here)."""
    import qiusuo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = qiusuo.load_model(args.model, dtype=dtype, device=device)
    tok = qiusuo.load_tokenizer(args.model)
    mem = args.cache_memory_mb * 2**20 if args.cache_memory_mb else None
    return Engine(model, tok, max_batch=max_batch, block_size=args.block_size, cache_memory=mem,
                  max_model_len=args.max_model_len, compile=args.compile)


def add_args(p: argparse.ArgumentParser) -> None:
    chat = p.prog.split()[-1] == "chat"
    add_model_args(p)
    if not chat:
        p.add_argument("--prompt", required=True, help="text to continue")
        p.add_argument("--template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    else:
        p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most per reply")
    p.add_argument("--temperature", type=float, default=0.7 if chat else 0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95 if chat else 1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same output)")
    p.set_defaults(chat=chat)


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _print(d: Delta) -> None:
    sys.stdout.write(d.text)
    sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    try:
        params = _params(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = load_engine(args, max_batch=1)
    if not args.chat:
        prompt = args.prompt
        if args.template:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        out = engine.generate([prompt], params, progress=_print)[0]
        print(f"\n[{out.usage.completion_tokens} tokens, finish: {out.outputs[0].finish_reason}]", file=sys.stderr)
        return 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("qiusuo chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        try:
            out = engine.generate([prompt], params, progress=_print)[0]
        except ValueError as e:  # the conversation outgrew the context
            print(f"\nerror: {e}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": out.outputs[0].text})
        print(f"\n[{out.usage.completion_tokens} tokens; {out.usage.cached_tokens} of {out.usage.prompt_tokens} "
              f"prompt tokens from the cache]", file=sys.stderr)
