"""The `qiusuo` command. Entry points are thin: each stage lives in its own module, which exposes
`add_args(parser)` and `main(args) -> int | None`. Modules are imported only when their command runs, so
`qiusuo --help` is instant and one broken stage cannot break the others."""

from __future__ import annotations

import argparse
import importlib
import sys

from qiusuo.io import CheckpointError

# command -> (module, one-line help). Order is the order of the stages.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("qiusuo.demo", "prepare the default corpus, train the demo MoE, sample from it (the main job)"),
    "prepare": ("qiusuo.data.prepare", "corpus -> BPE tokenizer -> token shards"),
    "train": ("qiusuo.train.run", "pretrain from a TOML run config (presets: demo, tiny, bench) with --key=value overrides"),
    "sft": ("qiusuo.rl.sft", "supervised fine-tuning on chats (.jsonl or a built-in task), loss on assistant tokens"),
    "grpo": ("qiusuo.rl.grpo", "R1-style GRPO with rule-based rewards on a built-in task, rollouts on the engine"),
    "eval": ("qiusuo.rl.eval", "accuracy of a model on a built-in task's test split"),
    "convert": ("qiusuo.hf.convert", "re-save a checkpoint in Hugging Face layout (dtype, FP8 blocks, shards)"),
    "inspect": ("qiusuo.hf.inspect", "what a checkpoint holds: architecture, parameters, dtype, MTP, FP8, shards"),
    "generate": ("qiusuo.infer.generate", "continue a prompt, streaming tokens to the terminal"),
    "chat": ("qiusuo.infer.chat", "interactive chat with the tokenizer's chat template (keeps the cached prefix)"),
    "serve": ("qiusuo.infer.server", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)"),
    "bench": ("qiusuo.bench", "benchmarks against transformers in the same run (train, decode, ...)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        # list commands without importing every stage
        parser = argparse.ArgumentParser(prog="qiusuo", description="DeepSeek-architecture models: define, train, interoperate, serve.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_) in COMMANDS.items():
            sub.add_parser(name, help=help_)
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 0
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    p = argparse.ArgumentParser(prog=f"qiusuo {name}", description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_args(p)
    args = p.parse_args(argv[1:])
    try:
        rc = module.main(args)
    except (CheckpointError, ValueError, OSError) as e:  # bad input: one line naming it, not a traceback
        print(f"qiusuo {name}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
