"""prepare end to end: shards hold exactly the tokenized documents, the split is disjoint, reruns are
byte-identical, the default stdlib source works, errors reach the user."""

import json
from pathlib import Path

import numpy as np
import pytest

from qiusuo.cli import main as cli_main
from qiusuo.data.prepare import prepare
from qiusuo.data.shards import TokenShards
from qiusuo.data.sources import DataError, iter_documents, split_documents
from qiusuo.data.tokenizer import Tokenizer


def make_corpus(root: Path, n: int = 60) -> Path:
    for i in range(n):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}  # 注释 ✓\n\n" for j in range(i % 7 + 1))
        (sub / f"mod{i:03d}.py").write_text(f"'''module {i}'''\r\n\t{body}")
    (root / "pkg0" / "readme.txt").write_text("not included\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = make_corpus(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("out")
    summary = prepare(out, [src], include=["*.py"], vocab_size=400, val_fraction=0.1, progress=False)
    return src, out, summary


def test_shards_hold_exactly_the_documents(prepared):
    src, out, summary = prepared
    tok = Tokenizer.from_dir(out)
    train_docs, val_docs = split_documents(list(iter_documents([src], include=["*.py"])), 0.1, 0)
    for name, docs in (("train", train_docs), ("val", val_docs)):
        shards = TokenShards(out / name)
        assert shards.tokens.dtype == np.uint16 and len(shards.doc_bounds) == len(docs) + 1
        assert shards.manifest["tokenizer_sha256"] == tok.sha256
        assert shards.num_bytes == sum(len(d.text.encode()) for d in docs)
        for i, doc in enumerate(docs):
            ids = shards.document(i)
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            assert tok.decode(ids[:-1]) == doc.text
        assert summary[name]["documents"] == len(docs) and summary[name]["tokens"] == len(shards)
    assert 1.0 < summary["bytes_per_token"] < 8.0
    assert 0.0 < summary["unigram_bpb"] < 8.0


def test_split_disjoint_by_file(prepared):
    src, out, _ = prepared
    train_docs, val_docs = split_documents(list(iter_documents([src], include=["*.py"])), 0.1, 0)
    assert val_docs and {d.key for d in train_docs}.isdisjoint({d.key for d in val_docs})
    assert len(train_docs) + len(val_docs) == 60


def test_rerun_is_byte_identical(prepared, tmp_path):
    src, out, _ = prepared
    again = tmp_path / "again"
    prepare(again, [src], include=["*.py"], vocab_size=400, val_fraction=0.1, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert {"tokenizer.json", "tokenizer_config.json", "prepare.json"} <= {str(f) for f in files}
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    # and into the same folder again: the old split folders are replaced, no temp folders left behind
    prepare(again, [src], include=["*.py"], vocab_size=400, val_fraction=0.1, progress=False)
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    assert json.loads((again / "prepare.json").read_text())["vocab_size"] == 400


def test_default_stdlib_source_small(tmp_path):
    summary = prepare(tmp_path, max_bytes=300_000, vocab_size=600, progress=False)
    assert summary["train"]["documents"] >= 1 and summary["val"]["documents"] >= 1
    assert 250_000 < summary["train"]["bytes"] + summary["val"]["bytes"] < 600_000
    assert json.loads((tmp_path / "prepare.json").read_text())["sources"] is None


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match=r"no non-empty documents found in .*src"):
        prepare(tmp_path / "out", [tmp_path / "src"], progress=False)


def test_cli(tmp_path, capsys):
    src = make_corpus(tmp_path / "src", n=10)
    assert cli_main(["prepare", str(src), "--include", "*.py", "--out", str(tmp_path / "o"), "--vocab-size", "300", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["documents"] >= 1
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    assert cli_main(["prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "field 'text' is missing" in capsys.readouterr().err
