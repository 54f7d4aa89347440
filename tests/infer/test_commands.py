"""`qiusuo generate` and `qiusuo chat` on a tiny model saved in Hugging Face layout."""

import builtins

import pytest

from qiusuo import cli
from qiusuo.infer import Engine, SamplingParams


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
