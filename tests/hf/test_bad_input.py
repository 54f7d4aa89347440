"""Bad checkpoints fail loudly, before anything is allocated: each case raises `CheckpointError` (a ValueError)
whose message names the offending file and, where there is one, the tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qiusuo import Transformer, get_config
from qiusuo.hf import CheckpointError, load_model, save_hf


VICTIM = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny checkpoint in two layouts: a single file and shards with an index."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    root = tmp_path_factory.mktemp("good")
    save_hf(model, root / "single", progress=False)
    save_hf(model, root / "sharded", max_shard_bytes=60_000, progress=False)
    return root


@pytest.fixture
def no_alloc(monkeypatch):
    """Fail the test if the loader allocates the model before it has rejected the input."""
    def refuse(self, *a, **k):
        raise AssertionError("parameters were allocated before the checkpoint was validated")
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


def copy(saved, tmp_path, layout="single"):
    dst = tmp_path / layout
    shutil.copytree(saved / layout, dst)
    return dst


def shard_of(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def rewrite(file, edit):
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def expect(folder, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_model(folder, progress=False)
    msg = str(err.value)
    for frag in fragments:
        assert str(frag) in msg, f"{frag!r} not in: {msg}"
    assert isinstance(err.value, ValueError)
    return msg


def test_good_checkpoints_load(saved):
    a, b = load_model(saved / "single", progress=False), load_model(saved / "sharded", progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_directory_without_config(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    (d / "config.json").unlink()
    expect(d, d / "config.json")
    expect(tmp_path / "nowhere", "nowhere")


def test_unsupported_model_type(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "model_type": "llama"}))
    expect(d, d / "config.json", "llama")


def test_missing_shard(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path, "sharded")
    shard = shard_of(d, VICTIM)
    shard.unlink()
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    expect(d, shard.name, "missing")
    assert any(f"'{n}'" in expect(d) for n, f in index.items() if f == shard.name)  # names a tensor it held


def test_no_weights_at_all(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    expect(d, "model.safetensors")


@pytest.mark.parametrize("cut", [1, 1000, 50_000])
def test_truncated_file(saved, tmp_path, no_alloc, cut):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-cut])
    msg = expect(d, f, "truncated")
    assert "'model." in msg or "'lm_head" in msg  # the first tensor that no longer fits is named


def test_truncated_inside_header(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    expect(d, f)
    f.write_bytes(b"\x01\x02")
    expect(d, f)


def test_corrupt_header(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    f.write_bytes(bytes(data))
    expect(d, f, "corrupt")


def test_unexpected_key(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    bogus = "model.layers.0.self_attn.rotary_scale.weight"
    rewrite(f, lambda t: t.update({bogus: torch.zeros(3)}))
    expect(d, f, bogus)


def test_missing_key(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path, "sharded")
    f = shard_of(d, VICTIM)
    rewrite(f, lambda t: t.pop(VICTIM))
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][VICTIM]
    index_file.write_text(json.dumps(index))
    expect(d, VICTIM, "missing")


def test_index_lists_a_tensor_its_shard_lacks(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path, "sharded")
    f = shard_of(d, VICTIM)
    rewrite(f, lambda t: t.pop(VICTIM))
    expect(d, f.name, VICTIM)


def test_shape_mismatch(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    rewrite(f, lambda t: t.update({VICTIM: t[VICTIM][:, :-1].contiguous()}))
    expect(d, f, VICTIM, "shape")


def test_config_disagrees_with_weights(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "kv_lora_rank": conf["kv_lora_rank"] * 2}))
    expect(d, "model.safetensors", "kv_a_")


def test_fp8_weight_without_its_scale(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    rewrite(f, lambda t: t.update({VICTIM: t[VICTIM].to(torch.float8_e4m3fn)}))
    expect(d, f, VICTIM, "scale_inv")


def test_fp8_scale_with_wrong_shape(saved, tmp_path, no_alloc):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    rewrite(f, lambda t: t.update({VICTIM: t[VICTIM].to(torch.float8_e4m3fn),
                                   VICTIM + "_scale_inv": torch.ones(2, 2)}))
    expect(d, f, VICTIM + "_scale_inv")
