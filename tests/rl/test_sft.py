"""SFT: chat files (bad lines named), assistant-only labels, packing without cross-example attention, a run."""

import json

import pytest
import torch

import qiusuo
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.model.transformer import IGNORE_INDEX
from qiusuo.rl.sft import ChatDataError, Example, build_rows, read_chats, run_sft, tokenize_chat
from qiusuo.train.config import load_run_config
from qiusuo.train.metrics import read

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 3+4."},
     {"role": "assistant", "content": "<think>3+4=7</think><answer>7</answer>"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "Compute 12+30."}, {"role": "assistant", "content": "<answer>42</answer>"}],
    [{"role": "user", "content": "Compute 9+9."}, {"role": "assistant", "content": "<think>9+9=18</think>18"}],
]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for c in CHATS for m in c] * 20
    return Tokenizer.train(texts, 300)


def test_malformed_lines_name_file_and_line(tmp_path):
    good = json.dumps({"messages": CHATS[0]})
    bad_cases = {
        '{"messages": [{"role": "user", "content": "x"}': "not valid JSON",
        '{"msgs": []}': 'non-empty list under "messages"',
        '{"messages": [{"role": "robot", "content": "x"}]}': "message 0 must be",
        '{"messages": [{"role": "user", "content": 3}]}': "message 0 must be",
        '{"messages": [{"role": "user", "content": "only a question"}]}': "no assistant message",
        "[1, 2]": 'non-empty list under "messages"',
    }
    for line, msg in bad_cases.items():
        f = tmp_path / "chats.jsonl"
        f.write_text(good + "\n\n" + good + "\n" + line + "\n" + good + "\n")
        with pytest.raises(ChatDataError, match=rf"{f}:4: .*{msg}"):
            read_chats(f)
    f.write_text(good + "\n\n" + good + "\n")
    assert [n for n, _ in read_chats(f)] == [1, 3]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChatDataError, match="empty"):
        read_chats(tmp_path / "empty.jsonl")


def test_cli_reports_bad_line(tmp_path, capsys):
    from qiusuo.cli import main

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": CHATS[0]}) + "\n{oops\n")
    assert main(["sft", "--data", str(f), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"{f}:2: not valid JSON" in capsys.readouterr().err


def test_only_assistant_tokens_are_trained(tok):
    end = tok.token_to_id("<|end|>")
    for chat in CHATS:
        ids, train = tokenize_chat(tok, chat)
        # rebuild the trained text from the flags: exactly each assistant turn's content followed by <|end|>
        spans, cur = [], []
        for i, t in zip(ids, train):
            if t:
                cur.append(i)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        want = [m["content"] for m in chat if m["role"] == "assistant"]
        assert [tok.decode(s[:-1]) for s in spans] == want
        assert all(s[-1] == end for s in spans)
        # every untrained token is system/user text, a role marker or an <|end|> of a non-assistant turn
        untrained = tok.decode([i for i, t in zip(ids, train) if not t])
        for m in chat:
            if m["role"] != "assistant":
                assert m["content"] in untrained
            else:
                assert m["content"] not in untrained
        # aligned labels: position t carries token t+1 iff token t+1 is trained
        _, labels, _ = build_rows([Example(ids, train, 1)], len(ids) + 3, 0, pack=False)
        for t in range(len(ids) - 1):
            assert labels[0, t] == (ids[t + 1] if train[t + 1] else IGNORE_INDEX)
        assert (labels[0, len(ids) - 1:] == IGNORE_INDEX).all()


def test_packing_never_attends_across_examples(tok):
    torch.manual_seed(0)
    cfg = qiusuo.get_config("tiny", vocab_size=tok.vocab_size)
    model = qiusuo.Transformer(cfg).eval()
    examples = [Example(*tokenize_chat(tok, c), line=i) for i, c in enumerate(CHATS)]
    ids, labels, docs = build_rows(examples, 96, tok.pad_id, pack=True)
    assert ids.shape[0] == 1 and set(docs[0].tolist()) == {-1, 0, 1, 2}  # all three in one row, then padding
    with torch.no_grad():
        packed = model(ids, doc_ids=docs)  # (1, 96, V)
        plain = model(ids)  # causal over the whole row: later chats see earlier ones
        pos = 0
        for ex in examples:
            n = len(ex.ids)
            alone = model(torch.tensor([ex.ids]))[0]
            err = (packed[0, pos:pos + n] - alone).abs().max().item()
            assert err < 1e-5, err
            if pos:
                assert (plain[0, pos:pos + n] - alone).abs().max().item() > 1e-3  # the mask is what makes it exact
            pos += n
    # the packed loss is the token-weighted mean of the per-chat losses
    with torch.no_grad():
        out = model(ids, labels=labels, doc_ids=docs, mtp_weight=0.0)
        ce_sum, count = 0.0, 0
        for ex in examples:
            _, lab, _ = build_rows([ex], len(ex.ids), tok.pad_id, pack=False)
            n = int((lab != IGNORE_INDEX).sum())
            ce_sum += float(model(torch.tensor([ex.ids]), labels=lab, mtp_weight=0.0).ce) * n
            count += n
    assert abs(float(out.ce) - ce_sum / count) < 1e-5


def test_too_long_chat_is_an_error(tok):
    ids, train = tokenize_chat(tok, CHATS[0])
    with pytest.raises(ChatDataError, match="line 9 has"):
        build_rows([Example(ids, train, 9)], 8, 0, pack=True)


def test_sft_run_learns_and_resumes(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 8))
    cfg = load_run_config("sft", {"sft.data": str(f), "model.preset": "tiny", "run.out_dir": str(tmp_path / "run"),
                                  "train.steps": 30, "data.batch_size": 4, "data.seq_len": 96, "optim.lr": 3e-3,
                                  "schedule.warmup_steps": 5, "train.log_every": 5, "checkpoint.every": 20,
                                  "run.threads": 1, "run.progress": False})
    summary = run_sft(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "ce" in r]  # the step records (the first record says which precision ran)
    assert recs[-1]["ce"] < 0.5 * recs[0]["ce"]
    assert (tmp_path / "run" / "loss.png").is_file() and summary["steps"] == 30
    model = qiusuo.load_model(summary["model"], progress=False)
    assert model.cfg.vocab_size == qiusuo.load_tokenizer(summary["model"]).vocab_size
    # resume from the step-20 checkpoint reaches step 30 again
    again = run_sft(cfg, resume=str(tmp_path / "run" / "checkpoints" / "step_000020"))
    assert again["steps"] == 30


def test_sft_resume_through_its_own_run_toml_is_exact(tmp_path):
    """SFT is the trainer: `qiusuo sft --resume RUN` reads the run's run.toml and repeats the same losses."""
    from qiusuo.cli import main

    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 4))
    base = ["sft", "--data", str(f), "--steps", "6", "--batch-size", "2", "--seq-len", "96", "--threads", "1",
            "--no-progress", "--train.log_every=1"]
    assert main([*base, "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--out-dir", str(tmp_path / "b"), "--checkpoint.every=3", "--train.steps=3"]) == 0
    assert main(["sft", "--resume", str(tmp_path / "b"), "--train.steps=6"]) == 0

    def losses(run):
        return [r["loss"] for r in read(run) if r["kind"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit
    assert load_run_config(tmp_path / "b" / "run.toml").sft.data == str(f)
