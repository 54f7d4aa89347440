"""`qiusuo chat`: an interactive conversation on the engine, with the tokenizer's chat template (or, for DeepSeek-V3.2
and V4 folders, which ship none, DeepSeek's encoding: `qiusuo.data.deepseek_encoding`). `--thinking` opens each reply
in thinking mode (the `thinking` variable DeepSeek's templates read; the encodings' thinking mode); with an encoding,
a reply's reasoning is kept apart from its text in the conversation, as DeepSeek's encoder expects past turns.

The whole conversation is re-sent each turn: the previous turn's prompt blocks are still in the engine's prefix
cache, so only the new tokens are prefilled (the cached count is shown after each reply).

Ctrl-C during a reply stops it (the engine aborts the request and frees its blocks; `Engine.generate` holds the
interrupt to the end of the step it lands in) and returns to the prompt; that turn is left out of the
conversation. At the prompt, Ctrl-D or /exit ends the session (code 0), Ctrl-C too, as an interrupt (130).

A base model is named at the start, so its code soup does not look like a broken chat. The rule: the tokenizer has
no chat format (no template, no encoding: then there is nothing to chat in: error), or the folder was exported by a pretraining run. A run
writes its exact config as run.toml in its folder and exports the model to RUN/model (a checkpoint,
RUN/checkpoints/step_N, holds its own run.toml); the run was `qiusuo sft` when `[sft] data` is set and `qiusuo grpo`
when `[grpo] model` is, else it was pretraining. A folder without a run.toml (a hub model, a copy) is not judged:
its chat template is all there is to go on, and trained tokenizers carry one whether or not the model learned it.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from qiusuo.infer.generate import add_sampling_args, print_delta, start
from qiusuo.infer.load import add_engine_args
from qiusuo.infer.output import ThinkSplitter
from qiusuo.infer.tools import REASONING_ENDS


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--thinking", action="store_true", help="open each reply in thinking mode (default: chat mode)")
    p.add_argument("--reasoning-effort", choices=("high", "max"), default=None,
                   help="DeepSeek-V4's reasoning effort in thinking mode (default: the model's, high)")
    add_sampling_args(p, temperature=0.7, top_p=0.95)


def pretraining_run(folder: str | Path) -> Path | None:
    """The run.toml that shows `folder` came from a pretraining run (see the module docstring), else None."""
    folder = Path(folder)
    for toml in (folder / "run.toml", folder.parent / "run.toml" if folder.name == "model" else None):
        if toml is None or not toml.is_file():
            continue
        try:
            cfg = tomllib.loads(toml.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None
        return None if cfg.get("sft", {}).get("data") or cfg.get("grpo", {}).get("model") else toml
    return None


def main(args: argparse.Namespace) -> int:
    started = start(args)
    if started is None:
        return 2
    params, engine = started
    tok = engine.tokenizer
    if not tok.has_chat_format:
        print(f"qiusuo chat: {args.model}'s tokenizer has no chat template, so there is no chat format to talk in "
              f"(a base model); continue text with qiusuo generate --model {args.model} --prompt TEXT", file=sys.stderr)
        return 2
    if (toml := pretraining_run(args.model)) is not None:
        print(f"qiusuo chat: note: this is a base model (pretraining run, {toml}): it continues text in the style "
              f"of its corpus and was never trained to reply; fine-tune it with qiusuo sft --model {args.model}",
              file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("qiusuo chat: /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\nqiusuo chat: interrupted", file=sys.stderr)
            return 130
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        mode = {"thinking": True} if args.thinking else {}
        if args.reasoning_effort:
            mode["reasoning_effort"] = args.reasoning_effort
        prompt = tok.encode_chat(messages, **mode)  # markers typed by the user stay plain text
        try:
            out = engine.generate([prompt], params, progress=print_delta)[0]
        except ValueError as e:  # the conversation outgrew the context
            print(f"\nerror: {e}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:  # the request is aborted and its blocks freed (Engine.generate)
            print("\n[reply stopped; this turn is left out of the conversation]", file=sys.stderr)
            messages.pop()
            continue
        messages.append(_assistant_turn(tok, prompt, out.outputs[0].text))
        print(f"\n[{out.usage.completion_tokens} tokens; {out.usage.cached_tokens} of {out.usage.prompt_tokens} "
              f"prompt tokens from the cache]", file=sys.stderr)


def _assistant_turn(tok, prompt: list[int], text: str) -> dict:
    """The reply as the conversation keeps it: with DeepSeek's encodings its reasoning apart (`reasoning_content`),
    which the encoder drops from earlier turns or writes back before `</think>`; with a template, the text as it
    came (the templates split it themselves)."""
    if tok.chat_encoding is None:
        return {"role": "assistant", "content": text}
    opened = tok.decode(prompt[-8:]).rstrip().endswith("<think>")
    reasoning, content = ThinkSplitter(opened, REASONING_ENDS.get(tok.chat_encoding, ())).feed(text, final=True)
    return {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if opened else {})}
