"""generation_config.json read and applied: its sampling values become the defaults of `generate` and `chat` (a flag
given wins), its eos ids end replies, and a bad file is refused naming the field."""

import argparse
import json

import pytest

from qiusuo import cli
from qiusuo.infer.generation_config import GenerationConfig, read_generation_config
from qiusuo.infer import Engine
from qiusuo.infer.generate import add_sampling_args, sampling_params
from qiusuo.io import CheckpointError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tok):
    from qiusuo.hf import save_hf

    d = tmp_path_factory.mktemp("gen")
    save_hf(model, d, tokenizer=tok)
    return d


def args_of(*argv, temperature=0.0, top_p=1.0):
    p = argparse.ArgumentParser()
    add_sampling_args(p, temperature=temperature, top_p=top_p)
    return p.parse_args(list(argv))


def test_flags_over_the_checkpoint_over_the_command():
    r1 = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended values
    p = sampling_params(args_of(), r1)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 0, 256)
    p = sampling_params(args_of("--temperature", "0", "--max-tokens", "5"), r1)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.0, 0.95, 5)
    p = sampling_params(args_of(temperature=0.7, top_p=0.9))  # no generation_config.json: the command's own
    assert (p.temperature, p.top_p) == (0.7, 0.9)


def test_read_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [1, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.95,
         "max_new_tokens": 100, "transformers_version": "4.46.3"}))
    assert read_generation_config(tmp_path) == GenerationConfig(
        {"temperature": 0.6, "top_p": 0.95, "max_tokens": 100}, (1, 7))
    assert read_generation_config(tmp_path / "none") == GenerationConfig()
    for bad, fragment in [({"temperature": 3.0}, "temperature"), ({"top_p": "high"}, "top_p must be a number"),
                          ({"eos_token_id": "</s>"}, "eos_token_id")]:
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=fragment):
            read_generation_config(tmp_path)


def test_generate_uses_the_checkpoint_defaults(model_dir, model, tok, capsys):
    """A greedy generation_config.json makes `generate --temperature 1` and plain `generate` differ only by the flag;
    its eos id list is honoured by the engine."""
    prompt = ["--model", str(model_dir), "--prompt", "The quick brown fox", "--max-tokens", "12", "--seed", "3"]
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "eos_token_id": [5, 6]}))
    assert cli.main(["generate", *prompt]) == 0
    greedy = capsys.readouterr().out
    engine = Engine(model, tok, generation=read_generation_config(model_dir))
    assert {5, 6, tok.eos_id} <= engine.stop_ids
    params = sampling_params(args_of("--max-tokens", "12"), engine.generation.sampling)
    assert params.temperature == 0.0 and greedy == engine.generate(["The quick brown fox"], params)[0].outputs[0].text
    assert cli.main(["generate", *prompt, "--temperature", "1.5", "--top-k", "50"]) == 0
    assert capsys.readouterr().out != greedy
