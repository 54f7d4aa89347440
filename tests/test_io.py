"""`qiusuo.io`: the one family of durable writes and the one `CheckpointError` that every loader raises."""

import pytest

from qiusuo import io
from qiusuo.hf import CheckpointError as HFError
from qiusuo.train import checkpoint as ckpt


def test_one_checkpoint_error_and_it_is_a_value_error():
    assert HFError is ckpt.CheckpointError is io.CheckpointError
    assert issubclass(io.CheckpointError, ValueError)


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    io.write_atomic(p, "old")
    io.write_atomic(p, b"new")
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_swaps_a_whole_folder(tmp_path):
    dst = tmp_path / "model"
    with io.atomic_dir(dst) as tmp:
        (tmp / "x").write_text("1")
    with io.atomic_dir(dst) as tmp:
        assert not (tmp / "x").exists()  # a fresh folder, not a copy of the old one
        (tmp / "y").write_text("2")
        assert (dst / "x").is_file()  # the old folder keeps its name until the new one is complete
    assert sorted(p.name for p in dst.iterdir()) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("keep", [False, True])
def test_atomic_dir_failure_keeps_the_old_folder(tmp_path, keep):
    dst = tmp_path / "model"
    with io.atomic_dir(dst) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(OSError, match="simulated"):
        with io.atomic_dir(dst, tmp_name=".tmp-model", keep_on_error=keep) as tmp:
            (tmp / "y").write_text("half")
            raise OSError("simulated")
    assert [p.name for p in dst.iterdir()] == ["x"]
    assert (tmp_path / ".tmp-model").exists() == keep  # kept: for `resume` to report, as after a crash
