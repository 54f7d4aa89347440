"""Run configuration: THE config system of every command that trains (`train`, `sft`, `grpo`, `bench train`,
`bench quality`). Small dataclasses, one per section, layered: the dataclass defaults, then a run preset
(`qiusuo/presets/*.toml`) or a TOML file (`--config`), then `--section.key=value` overrides.

A run config names a model size (`[model] preset = "demo"`, a name from `qiusuo.config.PRESETS`) and may override
any `ModelConfig` field in the same table (`hidden_size = 192`). Every other section is a dataclass below; its
fields and defaults are the documentation (`qiusuo train --help` prints them all). Overrides use dotted keys:
`--optim.lr=3e-4`, `--train.minutes=2`, `--model.num_hidden_layers=3`. An unknown key is an error that names the
closest known key. `add_config_args` gives a command its `--config`, one option per key, and the short aliases
users already type (`qiusuo sft --lr 1e-3` is `--optim.lr=1e-3`).

Run presets are named for the job (`pretrain-demo`, `pretrain-tiny`, `pretrain-bench`, `sft`, `grpo`) and model
sizes for the model (`tiny`, `bench`, `demo`, `deepseek-v3`, ...), so one name never means two things.

Precision: bf16 trains on a bf16 copy with fp32 master weights in one process (`qiusuo.train.precision`), with
autocast under several processes. `run.precision = "auto"` is bf16 on CUDA; on a CPU it picks the faster of fp32 and
bf16 (`qiusuo.runtime.pick_precision`): CPUs without native bf16 (AVX2-only, e.g. the 2-core EPYC this was tuned on,
where bf16 matmuls run ~50x slower) keep fp32 without measuring; CPUs with AVX512-BF16/AMX get bf16 only when its
measured matmul peak beats fp32's by 1.5x. The choice and the peaks are logged in the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qiusuo.config import ModelConfig, get_config


@dataclass
class RunSection:
    out_dir: str = "runs/train"  # checkpoints, metrics.jsonl, plots, samples and the final model go here
    seed: int = 0  # model init, data order, sampling
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 on CUDA; on CPU the measured faster of fp32 and bf16), "fp32", "bf16"
    compile: bool = False  # torch.compile the model (worth it on CUDA; minutes of compile time on a CPU)
    progress: bool = True  # tqdm bar on stderr
    threads: int = 0  # CPU threads for torch; 0: the cores not busy with other work (load average), at least 1


@dataclass
class ModelSection:
    preset: str = "demo"  # a name from qiusuo.config.PRESETS
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, written flat in [model] in TOML

    def build(self, vocab_size: int | None = None) -> ModelConfig:
        """The model config; `vocab_size` from the data's tokenizer wins unless the run overrides it."""
        extra = {} if vocab_size is None or "vocab_size" in self.overrides else {"vocab_size": vocab_size}
        return get_config(self.preset, **{**extra, **self.overrides})


@dataclass
class DataSection:
    dir: str = "runs/data"  # output of `qiusuo prepare` (tokenizer.json, train/, val/)
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 256  # tokens per sequence


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps (the schedule's length when no time budget is set)
    minutes: float = 0.0  # wall-clock budget; > 0: stop when spent and run the LR schedule on elapsed time
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    mtp_weight: float = 0.3  # lambda of the multi-token-prediction loss (ignored without MTP modules)
    log_every: int = 10  # steps between metrics.jsonl lines
    fp4_qat: bool = False  # fake-quantise routed experts to FP4 (e2m1, per-32 ue8m0 scales) in the forward, as exported
    fp4_qat_from: float = 0.0  # with fp4_qat: the share of the run after which it is on (DeepSeek-V4: the last part)
    indexer_warmup_steps: int = 0  # DeepSeek-V3.2: first steps with dense attention, the indexer learning to mimic it
    extra_minutes: float = 0.0  # with --resume: train this much longer than the run's budget, the lr decaying from where it stopped
    extra_steps: int = 0  # with --resume: the same for a run budgeted in steps


@dataclass
class OptimSection:
    name: str = "adamw"  # "adamw" | "muon" (Muon for hidden matrices and experts, AdamW for the rest: qiusuo.train.muon)
    lr: float = 3e-3  # peak learning rate (Muon too: its update RMS is matched to AdamW's, Moonlight's rule)
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.95  # Muon's momentum
    nesterov: bool = True  # Muon: Nesterov momentum
    ns_steps: int = 5  # Muon: Newton-Schulz iterations
    ns_dtype: str = "auto"  # Muon: Newton-Schulz in "bf16" | "fp32" | "auto" (bf16 on CUDA, fp32 on a CPU)


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # "cosine" (warmup, cosine to min) | "wsd" (warmup, stable, linear decay) | "constant"
    warmup_steps: int = 50  # linear warmup from 0 over these optimizer steps
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last share of training that decays
    tail_from: float = -1.0  # set by train.extra_*: where a "train longer" tail starts (seconds or steps); -1: none
    tail_lr: float = 0.0  # the tail's starting lr factor (it decays linearly to min_lr_ratio of it)


@dataclass
class EvalSection:
    every: int = 100  # steps between validation evaluations (0: only at the end)
    batches: int = 8  # validation batches per periodic evaluation, spread over the split; the final one reads it all
    sample_every: int = 0  # steps between sample generations (0: only at the end)
    sample_tokens: int = 64  # new tokens per sample
    prompts: list = field(default_factory=lambda: ["def ", "import os\n", "class Parser:\n    def __init__(self"])


@dataclass
class CheckpointSection:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 2  # keep the last K checkpoints


@dataclass
class BalanceSection:
    gamma: float = 1e-3  # aux-loss-free bias speed (DeepSeek-V3: 1e-3)
    alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3: 1e-4)


@dataclass
class ParallelSection:
    dp: str = "none"  # data parallel: "none" | "ddp" | "fsdp" (launched with torchrun; qiusuo.train.distributed)
    ep: int = 1  # expert-parallel degree: each rank owns n_routed_experts / ep experts of every MoE layer
    timeout_s: float = 300.0  # a collective waiting longer than this (a dead or stuck rank) fails with an error


@dataclass
class SFTSection:
    data: str = ""  # chat .jsonl ({"messages": [...]} per line) or task:SPEC (generated worked traces)
    init: str = ""  # model folder to fine-tune (Hugging Face layout); empty: a fresh [model] preset model
    tokenizer: str = ""  # tokenizer folder; empty: the init folder's, or one trained on the data
    vocab_size: int = 320  # BPE vocabulary when a tokenizer is trained on the data
    examples: int = 2000  # chats generated for task:SPEC data
    pack: bool = True  # several chats per row, attention kept within each (the MTP loss needs pack = false)


@dataclass
class GRPOSection:
    model: str = ""  # the policy: a model folder with its tokenizer (e.g. the output of qiusuo sft: RUN/model)
    task: str = "arithmetic"  # task spec (qiusuo.rl.tasks), e.g. arithmetic:digits=2 or countdown:count=3
    prompts_per_step: int = 8  # P
    group_size: int = 8  # G: completions per prompt (>= 2)
    max_tokens: int = 48  # per completion
    temperature: float = 1.0  # sampling temperature of the rollouts
    epsilon: float = 0.2  # clip range of the probability ratio
    beta: float = 0.04  # KL weight to the frozen reference (0: no reference model)
    mu: int = 1  # policy updates per rollout batch
    loss_norm: str = "token"  # "token" (all completion tokens) | "sequence" (per completion, then over them)
    adv_eps: float = 1e-4  # epsilon in (r - mean) / (std + eps)
    rewards: list = field(default_factory=lambda: ["accuracy", "format=0.1"])  # NAME[=WEIGHT]: accuracy, format, module:function, file.py:function
    micro_batch: int = 64  # completions per forward/backward
    block_size: int = 4  # engine cache block (small: short prompts still share their prefix across the group)
    # rollouts with MTP speculative decoding, K drafts per step (0: off, the default: GRPO does not train the MTP
    # module, so its drafts drift from the changing policy; the samples' distribution is exact either way)
    draft_tokens: int = 0
    eval_every: int = 10  # steps between test-accuracy checks (0: start and end only)
    eval_n: int = 100  # test problems per check


@dataclass
class LoraSection:
    rank: int = 0  # adapter rank r on every adapted matrix (2r on the experts' fused gate_up); 0: full fine-tuning
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r (peft's lora_alpha)
    targets: str = "attention,experts,shared,dense"  # tensor families that get adapters (qiusuo.lora.apply)
    dropout: float = 0.0  # dropout on the adapters' input while training
    rslora: bool = False  # scale alpha / sqrt(r) instead (rank-stabilised LoRA)
    router: bool = False  # also train the routers' weights in full (saved as peft's modules_to_save)
    norms: bool = False  # also train the RMSNorm gains in full
    quantize: str = ""  # the frozen base's weight formats (QLoRA), as --quantize: int4, int8, experts=int4,attention=int8, native; empty: the model dtype


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    sft: SFTSection = field(default_factory=SFTSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            section, name = key.split(".")
            return ValueError(f"run config {key}={getattr(getattr(self, section), name)!r}: {why}")

        for key in ("data.batch_size", "data.seq_len", "train.grad_accum"):
            s, n = key.split(".")
            if getattr(getattr(self, s), n) < 1:
                raise bad(key, "must be >= 1")
        if self.train.steps < 1 and self.train.minutes <= 0:
            raise bad("train.steps", "must be >= 1 (or set train.minutes)")
        if self.optim.lr <= 0:
            raise bad("optim.lr", "must be positive")
        if self.optim.name not in ("adamw", "muon"):
            raise bad("optim.name", "use 'adamw' or 'muon'")
        if self.optim.name == "muon" and self.parallel.dp == "fsdp":
            raise bad("optim.name", "Muon orthogonalises whole matrices; FSDP shards them (use parallel.dp='ddp')")
        if self.optim.ns_steps < 1:
            raise bad("optim.ns_steps", "must be >= 1")
        if not 0 <= self.train.fp4_qat_from <= 1:
            raise bad("train.fp4_qat_from", "must be in [0, 1]")
        if self.schedule.kind not in ("cosine", "wsd", "constant"):
            raise bad("schedule.kind", "use 'cosine', 'wsd' or 'constant'")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise bad("schedule.min_lr_ratio", "must be in [0, 1]")
        if not 0 < self.schedule.decay_fraction <= 1:
            raise bad("schedule.decay_fraction", "must be in (0, 1]")
        if self.run.precision not in ("auto", "fp32", "bf16"):
            raise bad("run.precision", "use 'auto', 'fp32' or 'bf16'")
        if self.optim.ns_dtype not in ("auto", "bf16", "fp32"):
            raise bad("optim.ns_dtype", "use 'auto', 'bf16' or 'fp32'")
        if self.parallel.dp not in ("none", "ddp", "fsdp"):
            raise bad("parallel.dp", "use 'none', 'ddp' or 'fsdp'")
        if self.parallel.ep < 1:
            raise bad("parallel.ep", "must be >= 1")
        if self.parallel.timeout_s <= 0:
            raise bad("parallel.timeout_s", "must be > 0 seconds")
        if self.checkpoint.keep < 1:
            raise bad("checkpoint.keep", "must be >= 1")
        if self.train.extra_minutes < 0 or self.train.extra_steps < 0:
            raise bad("train.extra_minutes" if self.train.extra_minutes < 0 else "train.extra_steps", "must be >= 0")
        g = self.grpo
        if g.group_size < 2:
            raise ValueError(f"run config grpo.group_size={g.group_size} (--group-size {g.group_size}): GRPO needs at "
                             "least 2 completions per prompt, since its advantage compares completions of the same "
                             "prompt (TRL and R1 use 8-64)")
        for key, ok in (("grpo.prompts_per_step", g.prompts_per_step >= 1), ("grpo.mu", g.mu >= 1),
                        ("grpo.max_tokens", g.max_tokens >= 1), ("grpo.micro_batch", g.micro_batch >= 1),
                        ("grpo.epsilon", 0 < g.epsilon < 1), ("grpo.beta", g.beta >= 0),
                        ("grpo.temperature", g.temperature > 0), ("grpo.draft_tokens", 0 <= g.draft_tokens <= 16),
                        ("grpo.loss_norm", g.loss_norm in ("token", "sequence"))):
            if not ok:
                raise bad(key, "is out of range")
        self._validate_lora(bad)
        self.model.build()  # raises ValueError naming a bad model field or preset

    def _validate_lora(self, bad) -> None:
        """Adapters train in one process with AdamW over a frozen base; what would change the base is refused."""
        lo = self.lora
        if lo.rank < 0:
            raise bad("lora.rank", "must be >= 0 (0: full fine-tuning)")
        if lo.rank == 0:
            if lo.quantize:
                raise bad("lora.quantize", "a packed base trains only through adapters: set lora.rank too")
            return
        from qiusuo.lora.apply import parse_targets
        from qiusuo.quant.apply import parse_spec

        parse_targets(lo.targets)
        parse_spec(lo.quantize or None)
        if lo.alpha <= 0:
            raise bad("lora.alpha", "must be > 0")
        if not 0 <= lo.dropout < 1:
            raise bad("lora.dropout", "must be in [0, 1)")
        if self.optim.name != "adamw":
            raise bad("optim.name", "adapters train with AdamW (Muon orthogonalises whole matrices, not r-row ones)")
        if self.parallel.dp != "none" or self.parallel.ep != 1:
            raise bad("parallel.dp" if self.parallel.dp != "none" else "parallel.ep",
                      "adapters train in one process (parallel.dp = 'none', parallel.ep = 1)")
        if self.train.fp4_qat:
            raise bad("train.fp4_qat", "fake-quantises the routed experts, which LoRA keeps frozen")

    def absolute_paths(self) -> None:
        """Folder and file settings made absolute (those that exist, and the output folder), so the run.toml a run
        records works from any working directory. Task specs and model size names stay as they are."""
        self.run.out_dir = str(Path(self.run.out_dir).absolute())
        for section, key in (("data", "dir"), ("sft", "data"), ("sft", "init"), ("sft", "tokenizer"), ("grpo", "model")):
            obj = getattr(self, section)
            value = getattr(obj, key)
            if value and Path(value).exists():
                setattr(obj, key, str(Path(value).absolute()))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, **self.model.overrides}
        return d

    def to_toml(self) -> str:
        """The exact config as TOML (recorded next to every checkpoint; `qiusuo train --config` reads it back)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
            lines.append("")
        return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def all_keys() -> list[str]:
    """Every settable dotted key (model fields included)."""
    keys = []
    for section, factory in SECTIONS.items():
        if section == "model":
            keys += ["model.preset"] + [f"model.{n}" for n in MODEL_FIELDS]
        else:
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(factory())]
    return keys


def _unknown(key: str) -> ValueError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ValueError(f"unknown run config key {key!r}{hint} (`qiusuo train --help` lists every key)")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the field's default type; strings from the command line are parsed."""
    if isinstance(value, str) and not isinstance(default, str):
        value = _parse_cli_value(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"run config {key}={value!r}: expected {type(default).__name__}")
    return value


def _parse_cli_value(text: str) -> Any:
    """`3e-4` -> float, `true` -> bool, `[1, 2]` -> list, anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(cfg: RunConfig, key: str, value: Any) -> None:
    """Set one dotted key, checking that it exists and that the value has the right type."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown(key)
    if section == "model":
        if name == "preset":
            cfg.model.preset = _coerce(key, value, "")
        elif name in MODEL_FIELDS:
            # types are checked by ModelConfig.validate when the config is built
            keep_str = isinstance(MODEL_FIELDS[name].default, str)
            cfg.model.overrides[name] = _parse_cli_value(value) if isinstance(value, str) and not keep_str else value
        else:
            raise _unknown(key)
        return
    obj = getattr(cfg, section)
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown(key)
    setattr(obj, name, _coerce(key, value, getattr(obj, name)))


def from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    for section, values in d.items():
        if section not in SECTIONS:
            raise _unknown(section + ".")
        if not isinstance(values, dict):
            raise ValueError(f"run config [{section}] must be a table, got {values!r}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)
    return cfg


def preset_path(name: str) -> Path | None:
    """A run preset shipped in qiusuo/presets/ (package data), or None."""
    p = importlib.resources.files("qiusuo") / "presets" / f"{name}.toml"
    return Path(str(p)) if p.is_file() else None


def preset_names() -> list[str]:
    root = importlib.resources.files("qiusuo") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml")) if root.is_dir() else []


def load_run_config(source: str | Path, overrides: list[str] | dict | None = None) -> RunConfig:
    """A run preset name (`pretrain-demo`, `sft`, ...) or a TOML path, then overrides: `["--optim.lr=3e-4", ...]` or a
    dict of dotted keys. The result is validated."""
    path = Path(source)
    if not path.is_file():
        path = preset_path(str(source))
        if path is None:
            raise FileNotFoundError(f"run config {source!r} is neither a TOML file nor a preset ({', '.join(preset_names())})")
    with open(path, "rb") as f:
        cfg = from_dict(tomllib.load(f))
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict | None) -> None:
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for arg in overrides or []:
            key, eq, value = arg.removeprefix("--").partition("=")
            if not eq:
                raise ValueError(f"override {arg!r} must look like --section.key=value (e.g. --optim.lr=3e-4)")
            items.append((key, value))
    for key, value in items:
        set_key(cfg, key, value)


def _field_comments(cls) -> dict[str, str]:
    """The `# why` comment after each field in the dataclass source: the help text of its key."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def key_help() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key; model fields take their defaults from the preset."""
    rows = []
    base = RunConfig()
    for section, factory in SECTIONS.items():
        if section == "model":
            rows.append(("model.preset", base.model.preset, "model size from qiusuo.config.PRESETS"))
            rows += [(f"model.{n}", None, "ModelConfig field (default: the preset's)") for n in MODEL_FIELDS]
            continue
        obj = getattr(base, section)
        comments = _field_comments(type(obj))
        rows += [(f"{section}.{f.name}", getattr(obj, f.name), comments.get(f.name, "")) for f in dataclasses.fields(obj)]
    return rows


# ------------------------------------------------------------------ the command line of every command that trains

def _error_with_hint(p: argparse.ArgumentParser, message: str):
    """argparse's error, plus the closest real key for a mistyped `--section.key` (Python 3.11's argparse does not
    suggest). Bound on the instance because cli.py builds the parser."""
    hints = []
    if message.startswith("unrecognized arguments:"):
        for arg in message.split(":", 1)[1].split():
            key = arg.removeprefix("--").partition("=")[0]
            near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5) if arg.startswith("--") else []
            hints += [f"--{key}: did you mean --{near[0]}?"] if near else []
    argparse.ArgumentParser.error(p, "; ".join([message, *hints]))


def add_override_args(p: argparse.ArgumentParser) -> None:
    """One `--section.key VALUE` option per run config key, so `--help` lists them all with their defaults.
    Unset keys stay out of the namespace (SUPPRESS); `overrides(args)` collects the set ones."""
    p.error = functools.partial(_error_with_hint, p)
    g = p.add_argument_group("run config keys (override the --config file; e.g. --optim.lr=3e-4)")
    for key, default, why in key_help():
        shown = "" if default is None else f" (default: {default!r})"
        g.add_argument(f"--{key}", dest=key, metavar="V", default=argparse.SUPPRESS, help=f"{why}{shown}")


def add_config_args(p: argparse.ArgumentParser, default_config: str | None, aliases: dict | None = None,
                    resumable: bool = True) -> None:
    """`--config PRESET_OR_TOML` (unset: `default_config`, or with --resume the run's own run.toml: `resumable`
    commands), every `--section.key`, and short aliases:
    `aliases` maps a flag to (dotted key, argparse keywords), e.g. {"--lr": ("optim.lr", {})} or
    {"--no-pack": ("sft.pack", {"action": "store_const", "const": False})}. An alias sets its key as if typed
    `--key=value`; the help says which key it stands for."""
    shown = f"; default: {default_config}" if default_config else ""
    resume = "; with --resume and no --config, the run's own run.toml" if resumable else ""
    p.add_argument("--config", default=None, help=f"run preset ({', '.join(preset_names())}) or a TOML file{shown}{resume}")
    p.set_defaults(default_config=default_config)
    if aliases:
        g = p.add_argument_group("short forms (each sets one run config key)")
        for flag, (key, kw) in aliases.items():
            kw = {"metavar": "V", **kw} if "action" not in kw or kw["action"] == "append" else dict(kw)
            g.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=f"= --{key}" + (f"; {kw.pop('help')}" if "help" in kw else ""), **kw)
    add_override_args(p)


def overrides(args: argparse.Namespace) -> dict:
    """The dotted keys set on the command line (by `--section.key` or an alias)."""
    return {k: v for k, v in vars(args).items() if "." in k}
