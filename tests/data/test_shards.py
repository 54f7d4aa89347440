"""Shards and the batch loader: dtype choice, x/y alignment, exact resume, rank split equals one rank."""

import numpy as np
import pytest
import torch

from qiusuo.data.shards import BatchLoader, TokenShards, unigram_bits_per_byte, write_shards


def make_shards(path, n_docs=40, vocab_size=1000, shard_tokens=100_000, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab_size, size=rng.integers(5, 60)).tolist() for _ in range(n_docs)]
    write_shards(path, ((d, 3 * len(d)) for d in docs), vocab_size=vocab_size, eos_id=0, tokenizer_sha256="x", shard_tokens=shard_tokens)
    return TokenShards(path), docs


def test_documents_and_multiple_shards(tmp_path):
    shards, docs = make_shards(tmp_path, shard_tokens=200)
    assert len(shards.manifest["shards"]) > 1
    assert shards.manifest["documents"] == len(docs)
    for i, d in enumerate(docs):
        assert shards.document(i).tolist() == d + [0]
    assert np.array_equal(shards.tokens, np.concatenate([d + [0] for d in docs]))
    assert shards.bytes_per_token == pytest.approx(sum(3 * len(d) for d in docs) / len(shards))


def test_dtype_follows_vocab(tmp_path):
    assert make_shards(tmp_path / "a", vocab_size=65536)[0].tokens.dtype == np.uint16
    big, docs = make_shards(tmp_path / "b", vocab_size=70_000)
    assert big.tokens.dtype == np.uint32 and big.document(0).tolist() == docs[0] + [0]
    with pytest.raises(ValueError, match="out of range"):
        write_shards(tmp_path / "c", [([5000], 1)], vocab_size=1000, eos_id=0, tokenizer_sha256="x")


def test_batches_are_shifted_windows(tmp_path):
    shards, _ = make_shards(tmp_path)
    loader = BatchLoader(shards, batch_size=4, seq_len=16, shuffle=False)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    tokens = torch.from_numpy(shards.tokens.astype(np.int64))
    assert torch.equal(x[1], tokens[16:32]) and torch.equal(y[1], tokens[17:33])


def test_resume_is_exact(tmp_path):
    shards, _ = make_shards(tmp_path)
    loader = BatchLoader(shards, batch_size=3, seq_len=8, seed=7)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = BatchLoader(shards, batch_size=3, seq_len=8, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(shards, batch_size=3, seq_len=9, seed=7).load_state_dict(state)


def test_epoch_is_a_permutation_of_all_windows(tmp_path):
    shards, _ = make_shards(tmp_path)
    loader = BatchLoader(shards, batch_size=1, seq_len=8, seed=1)
    rows = [tuple(next(loader)[0][0].tolist()) for _ in range(loader.num_windows)]
    tokens = shards.tokens.astype(np.int64)
    everything = [tuple(tokens[k * 8 : k * 8 + 8].tolist()) for k in range(loader.num_windows)]
    assert sorted(rows) == sorted(everything) and rows != everything


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_global_batch(tmp_path, world_size):
    shards, _ = make_shards(tmp_path)
    B = 8
    single = BatchLoader(shards, batch_size=B, seq_len=8, seed=3)
    ranks = [BatchLoader(shards, batch_size=B // world_size, seq_len=8, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(2 * single.steps_per_epoch + 1):  # crosses epoch boundaries
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_unigram_bits_per_byte(tmp_path):
    train, _ = make_shards(tmp_path / "t", vocab_size=50, seed=0)
    val, _ = make_shards(tmp_path / "v", vocab_size=50, seed=1)
    bpb = unigram_bits_per_byte(train, val, 50)
    # ~uniform tokens over 49 ids: about log2(49) bits per token, 3 bytes per token
    assert bpb == pytest.approx(np.log2(49) * len(val) / val.num_bytes, rel=0.05)
