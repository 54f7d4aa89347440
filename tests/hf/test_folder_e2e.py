"""The folder `save_hf(model, path, tokenizer)` writes is a complete Hugging Face model folder: transformers'
`AutoTokenizer` + `AutoModelForCausalLM` + `generate` (reading generation_config.json for the stop token) turn a
prompt into the same text as `qiusuo.load_tokenizer` + `qiusuo.load_model` + `generate`."""

import json

import pytest
import torch

import qiusuo
from qiusuo.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


CORPUS = ["the quick brown fox jumps over the lazy dog\n", "def f(x):\n    return x * 2\n",
          "hello world, hello qiusuo\n", "中文 and text\n"] * 5


def test_saved_folder_runs_the_same_in_transformers(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=320)
    cfg = qiusuo.get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                            initializer_range=0.2)
    torch.manual_seed(0)
    qiusuo.save_hf(qiusuo.Transformer(cfg), tmp_path / "m", tokenizer=tok, progress=False)
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["bos_token_id"] == tok.bos_id

    model, tokenizer = qiusuo.load_model(tmp_path / "m", progress=False), qiusuo.load_tokenizer(tmp_path / "m")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf_model.generation_config.eos_token_id == tok.eos_id

    messages = [{"role": "user", "content": "hello fox"}]
    prompt = tokenizer.apply_chat_template(messages) if tokenizer.chat_template else "hello fox"
    ids = tokenizer.encode(prompt)
    assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    ours = model.generate(x, 16, eos_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    with torch.no_grad():
        theirs = hf_model.generate(x, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs
    assert tokenizer.decode(ours) == hf_tok.decode(theirs)
