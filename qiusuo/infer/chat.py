"""`qiusuo chat`: an interactive conversation on the engine, with the tokenizer's chat template.

The whole conversation is re-sent each turn: the previous turn's prompt blocks are still in the engine's prefix
cache, so only the new tokens are prefilled (the cached count is shown after each reply).
"""

from __future__ import annotations

import argparse
import sys

from qiusuo.infer.generate import add_sampling_args, print_delta, start
from qiusuo.infer.load import add_engine_args


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_args(p, temperature=0.7, top_p=0.95)


def main(args: argparse.Namespace) -> int:
    started = start(args)
    if started is None:
        return 2
    params, engine = started
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
        prompt = engine.tokenizer.encode_chat(messages)  # markers typed by the user stay plain text
        try:
            out = engine.generate([prompt], params, progress=print_delta)[0]
        except ValueError as e:  # the conversation outgrew the context
            print(f"\nerror: {e}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": out.outputs[0].text})
        print(f"\n[{out.usage.completion_tokens} tokens; {out.usage.cached_tokens} of {out.usage.prompt_tokens} "
              f"prompt tokens from the cache]", file=sys.stderr)
