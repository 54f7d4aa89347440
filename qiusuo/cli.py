"""The `qiusuo` command. Entry points are thin: each stage lives in its own module, which exposes
`add_args(parser)` and `main(args) -> int | None`. Modules are imported only when their command runs, so
`qiusuo --help` is instant (no torch) and one broken stage cannot break the others.

What every command gets from here: bad input (CheckpointError, ValueError, OSError) as one line naming it, exit 2;
Ctrl-C as one line, exit 130 (the shell's code for SIGINT), never a traceback; an unknown option answered with the
closest option the command has (Python 3.11's argparse does not suggest)."""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import importlib.resources
import sys

from qiusuo.io import CheckpointError


def run_presets(prefix: str = "pretrain-") -> list[str]:
    """The run presets (qiusuo/presets/*.toml) whose names start with `prefix`. `qiusuo.train.config.preset_names`
    reads the same folder, but importing it imports torch, which `qiusuo --help` must not wait for."""
    root = importlib.resources.files("qiusuo") / "presets"
    names = [p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml")] if root.is_dir() else []
    return sorted(n for n in names if n.startswith(prefix))


# command -> (module, one-line help). Order is the order of the stages.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("qiusuo.demo", "prepare the default corpus, train the demo MoE, sample from it (the main job)"),
    "prepare": ("qiusuo.data.prepare", "corpus -> BPE tokenizer -> token shards"),
    "train": ("qiusuo.train.run", f"pretrain from a TOML run config (presets: {', '.join(run_presets())}) with "
              "--key=value overrides"),
    "sft": ("qiusuo.rl.sft", "supervised fine-tuning on chats (.jsonl or a built-in task), loss on assistant tokens"),
    "grpo": ("qiusuo.rl.grpo", "R1-style GRPO with rule-based rewards on a built-in task, rollouts on the engine"),
    "eval": ("qiusuo.rl.eval", "accuracy of a model on a built-in task's test split"),
    "convert": ("qiusuo.hf.convert", "re-save a checkpoint in Hugging Face layout (dtype, FP8 blocks, shards)"),
    "inspect": ("qiusuo.inspect_cmd", "what a checkpoint holds: architecture, parameters, dtype, MTP, FP8, shards"),
    "generate": ("qiusuo.infer.generate", "continue a prompt, streaming tokens to the terminal"),
    "chat": ("qiusuo.infer.chat", "interactive chat with the tokenizer's chat template (keeps the cached prefix)"),
    "serve": ("qiusuo.infer.server", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)"),
    "bench": ("qiusuo.bench", "benchmarks against transformers in the same run (train, decode, ...)"),
}


def _options(p: argparse.ArgumentParser) -> list[str]:
    """Every `--option` of `p` (a sub-command's parser: its own only)."""
    return [s for a in p._actions for s in a.option_strings if s.startswith("--")]


def _error_with_hint(p: argparse.ArgumentParser, argv: list[str], message: str):
    """argparse's error, plus the closest option of `p` for each `--option` in `argv` that `p` does not know
    ("--promt: did you mean --prompt?"). The unknown options are looked for in `argv`, not only in the message:
    a mistyped required option (`--promt` for `--prompt`) is reported by argparse as "required: --prompt", which
    does not name the typo."""
    known = _options(p)
    hints = []
    for arg in argv[: argv.index("--") if "--" in argv else len(argv)]:
        flag = arg.partition("=")[0]
        if not flag.startswith("--") or any(k.startswith(flag) for k in known):  # argparse takes unique prefixes
            continue
        near = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hints += [f"{flag}: did you mean {near[0]}?"] if near else []
    argparse.ArgumentParser.error(p, "; ".join([message, *dict.fromkeys(hints)]))


def add_hints(p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Give `p`, or its sub-command parsers (`bench NAME`), the closest-option hint for `argv` (the arguments about
    to be parsed), except those whose module set its own error handler already (the training commands' hint
    knows the run config's `--section.key` names)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and "error" not in vars(p):  # a parser with sub-commands leaves the options to them
        p.error = functools.partial(_error_with_hint, p, argv)
    for action in subs:
        for sub in set(action.choices.values()):
            add_hints(sub, argv)


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
    try:
        module_name, help_ = COMMANDS[name]
        module = importlib.import_module(module_name)  # seconds (torch): Ctrl-C may come here too
        p = argparse.ArgumentParser(prog=f"qiusuo {name}", description=help_,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_args(p)
        add_hints(p, argv[1:])
        args = p.parse_args(argv[1:])
        rc = module.main(args)
    except (CheckpointError, ValueError, OSError) as e:  # bad input: one line naming it, not a traceback
        print(f"qiusuo {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C is a normal way to stop; a command that saves state on it has done so
        print(f"\nqiusuo {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
