"""Sources: order, include globs, the default stdlib corpus, the split, and every bad-input error."""

import os

import pytest

from qiusuo.data.sources import DataError, Document, iter_documents, split_documents, stdlib_dir


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_folder_sorted_with_include_and_empty_files_dropped(tmp_path):
    write(tmp_path / "b.py", "b = 1\n")
    write(tmp_path / "a" / "z.py", "z = 1\n")
    write(tmp_path / "a" / "notes.txt", "not python\n")
    write(tmp_path / "empty.py", "  \n")
    docs = list(iter_documents([tmp_path], include=["*.py"]))
    assert [d.key for d in docs] == ["a/z.py", "b.py"]
    assert docs[0].text == "z = 1\n"


def test_text_is_exact_bytes(tmp_path):
    text = "windows\r\nline\ttab  spaces 世界 🎉\n"
    write(tmp_path / "f.txt", text.encode())
    (doc,) = iter_documents([tmp_path / "f.txt"])
    assert doc.text == text


def test_default_source_is_stdlib_without_tests():
    keys = [d.key for d in iter_documents()]
    assert keys == sorted(keys) and len(keys) > 300
    assert "os.py" in keys and all(k.endswith(".py") for k in keys)
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for k in keys for part in k.split("/"))
    assert stdlib_dir().is_dir()


def test_split_disjoint_deterministic_and_nonempty():
    docs = [Document(f"dir/f{i}.py", "x") for i in range(500)]
    train, val = split_documents(docs, 0.05, seed=0)
    assert {d.key for d in train}.isdisjoint(d.key for d in val)
    assert len(train) + len(val) == 500 and 5 < len(val) < 60
    assert split_documents(docs, 0.05, seed=0) == (train, val)
    # a document's split depends only on its key, not on the rest of the corpus
    assert {d.key for d in split_documents(docs[:250], 0.05)[1]} <= {d.key for d in val}
    small_train, small_val = split_documents(docs[:3], 0.02)
    assert len(small_val) == 1 and len(small_train) == 2


def test_jsonl_and_parquet(tmp_path):
    write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"body": "x", "text": "two"}\n')
    assert [(d.key, d.text) for d in iter_documents([tmp_path / "d.jsonl"])] == [("d.jsonl:1", "one"), ("d.jsonl:3", "two")]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", "beta"]}), tmp_path / "d.parquet")
    docs = list(iter_documents([tmp_path / "d.parquet"], parquet_column="content"))
    assert [d.text for d in docs] == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"column 'text' is missing.*\['content'\]"):
        list(iter_documents([tmp_path / "d.parquet"]))


def test_jsonl_missing_field_names_file_line_field_and_keys(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "x", "title": "y"}\n')
    with pytest.raises(DataError) as e:
        list(iter_documents([path]))
    msg = str(e.value)
    assert "d.jsonl:2" in msg and "'text'" in msg and "['body', 'title']" in msg


def test_jsonl_malformed_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        list(iter_documents([path]))


def test_explicit_binary_file_is_an_error(tmp_path):
    path = write(tmp_path / "blob.bin", b"abc\x00def")
    with pytest.raises(DataError, match=r"blob\.bin is a binary file"):
        list(iter_documents([path]))
    path = write(tmp_path / "latin1.txt", "café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8"):
        list(iter_documents([path]))


def test_folder_skips_binary_files_with_counted_warning(tmp_path):
    write(tmp_path / "a.txt", "hello\n")
    write(tmp_path / "img.png", b"\x89PNG\x00\x00")
    write(tmp_path / "bad.txt", b"\xff\xfe")
    with pytest.warns(UserWarning, match=r"skipped 2 binary or non-UTF-8 file\(s\)"):
        docs = list(iter_documents([tmp_path]))
    assert [d.key for d in docs] == ["a.txt"]


def test_unreadable_and_missing(tmp_path):
    write(tmp_path / "a.txt", "hello\n")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with pytest.raises(DataError, match=r"cannot read .*dangling\.txt"):
        list(iter_documents([tmp_path]))
    with pytest.raises(DataError, match=r"nope does not exist"):
        list(iter_documents([tmp_path / "nope"]))


def test_too_few_documents_for_split():
    with pytest.raises(DataError, match="at least 2"):
        split_documents([Document("a", "x")], 0.02)
