"""`qiusuo generate` and `qiusuo chat` on a tiny model saved in Hugging Face layout: output, Ctrl-C, the folder
they are given (a run folder, a base model)."""

import builtins
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from qiusuo import cli
from qiusuo.config import get_config
from qiusuo.infer import Engine, SamplingParams
from qiusuo.model.transformer import Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    from qiusuo.hf import save_hf

    d = tmp_path_factory.mktemp("tiny")
    save_hf(model, d, tokenizer=tok)
    return str(d)


def test_generate_streams_the_engine_output(model_dir, model, tok, capsys):
    assert cli.main(["generate", "--model", model_dir, "--prompt", "The quick brown fox", "--max-tokens", "12"]) == 0
    out = capsys.readouterr()
    ref = Engine(model, tok).generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.out == ref.outputs[0].text
    assert f"finish: {ref.outputs[0].finish_reason}" in out.err


def test_chat_keeps_conversation_and_reuses_cached_prefix(model_dir, capsys, monkeypatch):
    lines = iter(["Hello world, this is a longer first message", "and a second one", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--model", model_dir, "--max-tokens", "6", "--temperature", "0",
                     "--block-size", "4"]) == 0
    err = capsys.readouterr().err
    cached = [int(line.split("; ")[1].split()[0]) for line in err.splitlines() if "from the cache" in line]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] >= 8  # turn 2 reuses turn 1's prompt blocks


# ---- Ctrl-C ----

def _default_sigint() -> None:
    """In a child before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt handler. A
    process started in the background by a shell without job control (a CI script's `cmd &`) ignores SIGINT, and
    its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """SIGINT raises KeyboardInterrupt in this process for the test (Python's own handler), as at a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory, tok):
    """A model folder whose replies end only at max_tokens: a 4,096-token context, and a tokenizer with no EOS
    and no chat template (so no stop ids), so a long generation is still running when the test interrupts it."""
    from qiusuo.hf import save_hf

    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                   max_position_embeddings=4096)).eval()
    d = tmp_path_factory.mktemp("endless")
    save_hf(model, d, tokenizer=tok)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": None, "chat_template": None}))
    return d


def test_generate_ctrl_c_is_one_line_and_exit_130(endless_dir):
    """A real SIGINT to `qiusuo generate` mid-stream: one line on stderr, exit code 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "generate", "--model", str(endless_dir), "--prompt",
                             "The quick brown fox", "--max-tokens", "4000", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    try:
        assert proc.stdout.read(1), "no text streamed"  # the model is loaded and decoding
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("qiusuo generate: interrupted")


@pytest.mark.parametrize("how", ["signal", "exception"])
def test_chat_ctrl_c_stops_the_reply_frees_it_and_returns_to_the_prompt(model_dir, capsys, monkeypatch, how,
                                                                       python_sigint):
    """Ctrl-C during a reply: the request is aborted (the engine ends with nothing running and no block held),
    the turn left out, and the next turn runs. "signal": a real SIGINT, held by the engine to the end of its step;
    "exception": a KeyboardInterrupt inside a step (as a second Ctrl-C would raise)."""
    from qiusuo.infer import chat

    engines, states, deltas = [], [], []
    real_start = chat.start

    def start(args):
        started = real_start(args)
        engines.append(started[1])
        return started

    def progress(d):
        deltas.append(d)
        if len(deltas) == 1:  # the first reply's first text
            if how == "signal":
                assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # held while stepping
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt

    lines = iter(["Hello world, this is a longer first message", "and a second one", "/exit"])

    def read_line(prompt=""):
        e = engines[0]
        states.append((len(e.running), len(e.waiting), e.pool.used_blocks))
        return next(lines)

    monkeypatch.setattr(chat, "start", start)
    monkeypatch.setattr(chat, "print_delta", progress)
    monkeypatch.setattr(builtins, "input", read_line)
    try:
        rc = cli.main(["chat", "--model", model_dir, "--max-tokens", "12", "--temperature", "0", "--block-size", "4"])
    except KeyboardInterrupt:  # a failure of this test, not a reason to stop the whole session
        pytest.fail("Ctrl-C during a reply escaped `qiusuo chat`")
    assert rc == 0
    err = capsys.readouterr().err
    assert "[reply stopped; this turn is left out of the conversation]" in err and "Traceback" not in err
    assert states[1] == (0, 0, 0)  # after the stopped reply: nothing running or waiting, every block free
    assert err.count("from the cache]") == 1  # the next turn ran to its end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_chat_ends_at_the_prompt_on_ctrl_c_and_ctrl_d(model_dir, capsys, monkeypatch):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupt)
    assert cli.main(["chat", "--model", model_dir]) == 130
    assert capsys.readouterr().err.rstrip().endswith("qiusuo chat: interrupted")

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert cli.main(["chat", "--model", model_dir]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ---- the folder given ----

def test_a_run_folder_is_named_with_its_model_before_anything_starts(model_dir, tmp_path, capsys, monkeypatch):
    """`--model RUN` (what `qiusuo train` prints as its folder) names RUN/model for generate, chat and serve;
    serve says so before its server starts. A folder with neither config.json nor model/ is named too."""
    from qiusuo.infer import server

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(server, "Server", lambda *a, **k: pytest.fail("the server started"))
    monkeypatch.setattr(builtins, "input", lambda prompt="": "/exit")
    for command in (["generate", "--prompt", "hi"], ["chat"], ["serve"]):
        assert cli.main([command[0], "--model", str(run), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{run} is a run folder; its model is {run / 'model'} (pass --model {run / 'model'})" in err, err
        assert cli.main([command[0], "--model", str(tmp_path / "empty"), *command[1:]]) == 2
        assert f"{tmp_path / 'empty' / 'config.json'}: not found" in capsys.readouterr().err


def test_chat_says_when_the_model_is_a_base_model(model_dir, tmp_path, capsys, monkeypatch):
    """One line at the start for a pretraining run's model (RUN/run.toml with no [sft] data or [grpo] model), none
    for an SFT run's; a tokenizer without a chat template is refused (there is no chat format)."""
    from qiusuo.train.config import load_run_config

    runs = {"pre": load_run_config("pretrain-tiny"), "sft": load_run_config("sft", {"sft.data": "chats.jsonl"})}
    for name, cfg in runs.items():
        shutil.copytree(model_dir, tmp_path / name / "model")
        (tmp_path / name / "run.toml").write_text(cfg.to_toml())
    monkeypatch.setattr(builtins, "input", lambda prompt="": "/exit")
    assert cli.main(["chat", "--model", str(tmp_path / "pre" / "model")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "base model" in line]
    assert len(notes) == 1 and "never trained to reply" in notes[0] and "qiusuo sft" in notes[0]
    assert cli.main(["chat", "--model", str(tmp_path / "sft" / "model")]) == 0
    assert "base model" not in capsys.readouterr().err

    d = tmp_path / "no-template"
    shutil.copytree(model_dir, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": None}))
    assert cli.main(["chat", "--model", str(d)]) == 2
    assert "has no chat template" in capsys.readouterr().err
