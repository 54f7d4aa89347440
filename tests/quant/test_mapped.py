"""`load_model(mmap=True)`: packed expert banks live in files the page cache holds; the model computes what the
in-memory load computes, the first load writes the files, a second maps them and reads no expert tensor from the
checkpoint, and a changed checkpoint is never served stale banks."""

import os

import pytest
import torch

import qiusuo.hf.load as load_mod
from qiusuo.config import get_config
from qiusuo.hf import load_model, save_hf
from qiusuo.model.transformer import Transformer
from qiusuo.quant.modules import QuantExperts


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QIUSUO_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", vocab_size=256, hidden_size=128, moe_intermediate_size=64,
                               num_nextn_predict_layers=0)).eval()
    m.reset_parameters(0)
    save_hf(m, tmp_path / "m", progress=False)
    return tmp_path / "m"


def expert_reads(monkeypatch) -> list:
    calls = []
    real = load_mod._load_packed
    monkeypatch.setattr(load_mod, "_load_packed", lambda *a: (calls.append(a[1].ours), real(*a))[1])
    return calls


def test_mapped_banks_compute_the_same_and_are_reused(folder, monkeypatch):
    ids = torch.randint(0, 256, (2, 9))
    plain = load_model(folder, dtype=torch.float32, quantize="experts=int4", progress=False)
    reads = expert_reads(monkeypatch)
    first = load_model(folder, dtype=torch.float32, quantize="experts=int4", mmap=True, progress=False)
    assert any(".experts." in r for r in reads)
    banks = [m for m in first.modules() if isinstance(m, QuantExperts)]
    maps = open("/proc/self/maps").read()
    assert banks and str(os.environ["QIUSUO_CACHE"]) in maps  # file-backed mappings of our cache
    with torch.no_grad():
        assert torch.equal(first(ids), plain(ids))
    reads.clear()
    second = load_model(folder, dtype=torch.float32, quantize="experts=int4", mmap=True, progress=False)
    assert not any(".experts." in r for r in reads)  # nothing read: the banks are the mapped files
    with torch.no_grad():
        assert torch.equal(second(ids), plain(ids))
    # a changed checkpoint (new mtime) invalidates the files
    st = os.stat(folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_model(folder, dtype=torch.float32, quantize="experts=int4", mmap=True, progress=False)
    assert any(".experts." in r for r in reads)


def test_mmap_without_packed_experts_is_refused(folder):
    with pytest.raises(ValueError, match="packs no experts"):
        load_model(folder, mmap=True, progress=False)
