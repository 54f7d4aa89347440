"""Published tokenizers behind one interface, and text from users never becoming control tokens.

DeepSeek stores its role, think and tool markers as *non-special* added tokens (a DeepSeek-style tokenizer.json with
DeepSeek-V3's real tokenizer_config.json); Kimi-K2 and Moonlight ship tiktoken BPEs (their real tokenizer_config.json
with a synthetic `tiktoken.model` of the same format and size). For both: user text containing every control marker
yields no control id, the template's own markers still do, `skip_special_tokens` drops them all, the end-of-turn token
comes from the template, BOS follows `add_bos_token`."""

import json
import shutil

import pytest
from published_checkpoints import DS_MARKERS, DS_SPECIAL, FIXTURES, deepseek_style_folder, kimi_folder

from qiusuo.config import ModelConfig
from qiusuo.data.tokenizer import MOONSHOT_PATTERN, TiktokenTokenizer, Tokenizer, Trusted, read_tiktoken_model


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Tokenizer.from_dir(deepseek_style_folder(tmp_path_factory.mktemp("ds")))


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return Tokenizer.from_dir(kimi_folder(tmp_path_factory.mktemp("kimi")))


def control_tokens(tok, ids):
    return [tok.id_to_token(i) for i in ids if i in tok.control_ids]


def test_deepseek_markers_are_control_tokens_though_not_special(ds):
    added = json.loads(ds.to_json())["added_tokens"]
    assert {t["content"] for t in added if not t["special"]} == set(DS_MARKERS)  # as DeepSeek stores them
    assert {ds.token_to_id(t) for t in DS_MARKERS + DS_SPECIAL} <= ds.control_ids
    text = "a" + "".join(DS_MARKERS) + "b"
    plain = ds.encode(text, add_bos=False, parse_special=False)
    assert not set(plain) & ds.control_ids and ds.decode(plain) == text  # plain characters, exactly
    assert len(set(ds.encode(text, add_bos=False)) & ds.control_ids) == len(DS_MARKERS)  # parsed when meant


@pytest.mark.parametrize("which", ["ds", "kimi"])
def test_user_text_with_every_marker_never_yields_a_control_id(which, request):
    tok = request.getfixturevalue(which)
    every = "".join(tok.control)  # every control token's text: roles, think, tool markers, BOS/EOS, reserved ids
    benign = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": "bye"}]
    forged = [{"role": m["role"], "content": f"{m['content']} {every} {m['content']}"} for m in benign]
    want = control_tokens(tok, tok.encode_chat(benign))
    got = tok.encode_chat(forged)
    assert control_tokens(tok, got) == want and len(want) >= 6  # only the template's own markers
    assert every in tok.decode(got)  # the user's text is all there, as characters
    # rendering to a string and encoding it, transformers' way, turns the forged markers into control ids
    assert len(control_tokens(tok, tok.encode(tok.apply_chat_template(forged), add_bos=False))) > len(want)
    # trusted markup keeps its markers, the untrusted parts beside it do not
    mixed = [{"role": "system", "content": Trusted([(every[:200], False), (tok.eos_token, True)])}]
    assert control_tokens(tok, tok.encode_chat(mixed)).count(tok.eos_token) >= 1 + control_tokens(
        tok, tok.encode_chat([{"role": "system", "content": "x"}])).count(tok.eos_token)


def test_skip_special_tokens_drops_every_control_token(ds, kimi):
    for tok, marker in ((ds, "<｜Assistant｜>"), (kimi, "<|im_assistant|>")):
        ids = tok.encode(f"Hello{marker}world{tok.eos_token}", add_bos=False)
        assert tok.token_to_id(marker) in ids
        assert tok.decode(ids) == f"Hello{marker}world{tok.eos_token}"
        assert tok.decode(ids, skip_special_tokens=True) == "Helloworld"


def test_end_of_turn_and_bos_come_from_the_checkpoint(ds, kimi):
    assert ds.stop_ids == {ds.token_to_id("<｜end▁of▁sentence｜>")}  # DeepSeek ends turns with its EOS
    assert kimi.stop_ids == {163585, 163586}  # [EOS] and the template's <|im_end|>
    ours = Tokenizer.train(["hello world " * 5] * 4, vocab_size=300)
    assert ours.stop_ids == {ours.eos_id, ours.token_to_id("<|end|>")}
    # add_bos_token: true (DeepSeek-V3's tokenizer_config.json): plain prompts get BOS, as transformers' tokenizer(text)
    assert ds.add_bos_token and ds.encode("hi")[0] == ds.bos_id and ds.encode("hi", add_bos=False)[0] != ds.bos_id
    assert ds.encode_chat([{"role": "user", "content": "hi"}]).count(ds.bos_id) == 1  # the template's own, once
    assert ours.encode("hi")[0] != ours.bos_id  # our own tokenizers say add_bos_token: false


def test_chat_template_variables(ds):
    messages = [{"role": "user", "content": "hi"}]
    assert ds.apply_chat_template(messages, bos_token="<B>").startswith("<B><｜User｜>hi")  # no keyword clash
    assert ds.apply_chat_template(messages).endswith("<｜Assistant｜>")  # add_generation_prompt defaults to True here
    assert ds.apply_chat_template(messages, add_generation_prompt=False).endswith("hi")


def test_kimi_tiktoken_tokenizer(kimi, tmp_path):
    """Kimi-K2's real tokenizer_config.json over a tiktoken.model of its size: the config's ids are the special ids,
    the pattern is Moonshot's, text round-trips, the chat template renders."""
    assert isinstance(kimi, TiktokenTokenizer) and kimi.vocab_size == 163_840
    assert (kimi.bos_id, kimi.eos_id, kimi.pad_id) == (163584, 163585, 163839)
    assert kimi.token_to_id("<|im_end|>") == 163586 and kimi.token_to_id("<|reserved_token_163600|>") == 163600
    for text in ["plain ascii", "中文字符 and text", "tabs\t\tand\r\n", "emoji 🎉", "", "x" * 30_000 + " " * 30_000]:
        assert kimi.decode(kimi.encode(text)) == text
    assert kimi.encode("hello world") == kimi._enc.encode("hello world") and kimi._pattern == MOONSHOT_PATTERN
    text = kimi.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user")
    # a folder's own tokenization_*.py sets the pattern and the special count, read (never run) with ast
    folder = kimi_folder(tmp_path / "own")
    (folder / "tokenization_kimi.py").write_text('import os\nclass T:\n    num_reserved_special_tokens = 256\n'
                                                 '    pat_str = "|".join([r"""\\p{L}+""", r"""[^\\p{L}]+"""])\n'
                                                 'raise SystemExit("never run")\n')
    own = Tokenizer.from_dir(folder)
    assert own._pattern == r"\p{L}+|[^\p{L}]+" and own.decode(own.encode("ab, cd")) == "ab, cd"
    own.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.encode("hello <|im_end|> 你好") == own.encode("hello <|im_end|> 你好")
    assert read_tiktoken_model(tmp_path / "saved" / "tiktoken.model") == own._ranks


def test_moonlight_config_and_tokenizer(tmp_path):
    """Moonlight-16B-A3B's config.json parses to its published shape, and its vocabulary (Kimi's: 163,584 ranks + 256
    specials) tokenizes through the same folder layout."""
    folder = kimi_folder(tmp_path / "moonlight", "moonlight-16b-a3b")
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    tok = Tokenizer.from_dir(folder)
    assert tok.vocab_size == cfg.vocab_size == 163_840 and cfg.eos_token_id == 163586 == tok.token_to_id("<|im_end|>")


def test_bad_tokenizer_folders_name_the_problem(tmp_path):
    folder = kimi_folder(tmp_path / "k")
    (folder / "tiktoken.model").write_bytes(b"aGk= 0\naGk= 1\n")
    with pytest.raises(ValueError, match="ranks are not 0..0"):
        Tokenizer.from_dir(folder)
    (folder / "tiktoken.model").write_bytes(b"not base64!! 0\n")
    with pytest.raises(ValueError, match="tiktoken.model:1: not a tiktoken BPE line"):
        Tokenizer.from_dir(folder)
    shutil.copy(FIXTURES / "kimi-k2" / "tokenizer_config.json", folder)
    (folder / "tiktoken.model").write_bytes(b"".join(b"%s %d\n" % (__import__("base64").b64encode(bytes([i])), i)
                                                    for i in range(256)))
    with pytest.raises(ValueError, match="added token id 163584"):
        Tokenizer.from_dir(folder)
    (folder / "tiktoken.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(folder)
