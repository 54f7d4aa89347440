"""Cache precision (`qiusuo/cache/precision.py`): FP8 tiles against their definition, FP8 cache decoding
against the forward without a cache (measured bounds) and against itself in one shot, bytes per token from
the counting code against what the pool allocates, bad choices named."""

import pytest
import torch

from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.cache.pool import BlockPool
from qiusuo.cache.precision import CacheDtype, Fp8Tiles
from qiusuo.cache.spec import block_bytes, state_bytes
from qiusuo.config import get_config
from qiusuo.model.count import cache_bytes_per_token
from qiusuo.model.transformer import Transformer

CONFIGS = {
    "v3": dict(name="tiny"),
    "v32": dict(name="tiny", model_type="deepseek_v32", index_n_heads=16, index_head_dim=16, index_topk=8),
    "v4": dict(name="v4-tiny", index_n_heads=16),
}
# FP8 cache logits vs the forward without a cache, 48 tokens (30 prefilled, 18 decoded), seed-0 tiny models:
# measured max 0.0086 (V3), 0.10 (V3.2: a few indexer choices flip), 0.043 (V4); mean 0.0008, 0.0042, 0.0033.
# Bounds about 3x those
MAX_DIFF = {"v3": 0.03, "v32": 0.3, "v4": 0.15}
MEAN_DIFF = 0.012


def tiny(kind: str) -> Transformer:
    kw = dict(CONFIGS[kind])
    torch.manual_seed(0)
    return Transformer(get_config(kw.pop("name"), num_nextn_predict_layers=0, **kw)).eval()


def test_fp8_tiles_roundtrip():
    """Each value within e4m3's half-ulp (1/16 relative) of itself, or a subnormal step of its tile's scale; the
    rotary part exactly bf16; reading what was read gives it back (power-of-two scales re-quantise exactly);
    writes and reads by slot give the roundtrip; an all-zero row stays zero."""
    comp = Fp8Tiles((8,), 96, 32, "cpu")  # 64 quantised values: one tile
    x = torch.randn(200, 96) * torch.logspace(-3, 2, 200)[:, None]  # rows across 5 decades
    x[:, 5] *= 50  # an outlier channel
    x[0] = 0
    r = comp.roundtrip(x).float()
    q = x[:, :64]
    amax = q.abs().amax(-1, keepdim=True)
    assert ((r[:, :64] - q).abs() <= q.abs() / 16 + amax / (224 * 1024)).all()
    assert torch.equal(r[:, 64:], x[:, 64:].to(torch.bfloat16).float())
    assert torch.equal(comp.roundtrip(r), r.to(torch.bfloat16))
    assert r[0].abs().sum() == 0
    at = (torch.tensor([3, 1]),)
    comp.write(at, x[10:12])
    assert torch.equal(comp.read(at).float(), r[10:12])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_reads_in_one_c_pass_equal_the_torch_formulation(dtype, monkeypatch):
    """The C gather + dequantisation (`kernels.fp8_rows`, what a CPU read runs) against `dequantise` of the
    gathered parts, bit for bit: every e4m3 code but NaN (subnormals, both zeros), scale exponents from 0 (2^-127)
    to 254, a tile width that leaves a tail past the vector loop, repeated and unordered slots."""
    from qiusuo.quant import kernels

    if not kernels.available():
        pytest.skip(kernels.build_error())
    comp = Fp8Tiles((300,), 60, 12, "cpu", dtype)  # 48 quantised values: tiles of 16
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, comp.codes.shape, generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # no NaN
    codes[0, :] = torch.arange(48, dtype=torch.uint8)  # zero and the subnormals
    comp.codes.copy_(codes.view(torch.float8_e4m3fn))
    comp.exps.copy_(torch.randint(100, 150, comp.exps.shape, generator=g, dtype=torch.uint8))
    comp.exps[1] = torch.tensor([0, 254, 127], dtype=torch.uint8)
    comp.rot.copy_(torch.randn(comp.rot.shape, generator=g))
    at = (torch.tensor([[1, 0, 299], [5, 5, 42]]),)
    fast = comp.read(at)
    monkeypatch.setenv("QIUSUO_KERNELS", "0")  # read when a component binds its storage
    torch_comp = Fp8Tiles((300,), 60, 12, "cpu", dtype)
    for mine, theirs in zip(torch_comp.tensors, comp.tensors):
        mine.copy_(theirs)
    slow = torch_comp.read(at)
    assert fast.dtype == slow.dtype == dtype and fast.shape == (2, 3, 60)
    assert torch.equal(fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       slow.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    monkeypatch.delenv("QIUSUO_KERNELS")
    with pytest.raises(IndexError, match="out of range"):
        comp.read((torch.tensor([300]),))


def test_fp8_writes_in_one_c_pass_equal_the_torch_formulation(monkeypatch):
    """The C quantise + scatter (`kernels.fp8_write`, what a CPU write runs) against `quantise` + index_put_, bit
    for bit: rows over 60 decades, a tile whose amax / 448 is exactly a power of two (the scale's boundary), values
    exactly halfway between e4m3 codes (normal and subnormal: ties to even), bf16 ties in the rotary part, and
    (state, slot) indices of a ring; the rows given back as stored (`stored=True`, from the same C pass) equal to
    the torch roundtrip and to a read of the slots."""
    from qiusuo.quant import kernels

    if not kernels.available():
        pytest.skip(kernels.build_error())
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 60, generator=g) * torch.logspace(-30, 30, 40)[:, None]
    rows[0, :16] = 448.0 * 2.0**-3  # amax / 448 a power of two
    rows[1, :16] = torch.tensor([448, 1.0625, 1.1875, 2**-7 * 1.5, 2**-9 * 0.5, 2**-9 * 1.5, 2**-9 * 2.5, -3.25,
                                 0.0, -0.0, 2**-10, 416, 432, 1.125, 1.375, 3.0])  # ties, subnormal ties, 448
    rows[2, 48:] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130, 1.5, 0.0] * 2)  # bf16 ties
    states, slots = torch.arange(40) % 4, torch.arange(40) // 4  # every (state, slot) of a 4 x 10 ring once
    fast = Fp8Tiles((4, 10), 60, 12, "cpu")
    back = fast.write((states, slots), rows, stored=True)
    assert torch.equal(back.view(torch.int16), fast.read((states, slots)).view(torch.int16))
    monkeypatch.setenv("QIUSUO_KERNELS", "0")  # read when a component binds its storage
    slow = Fp8Tiles((4, 10), 60, 12, "cpu")
    slow_back = slow.write((states, slots), rows, stored=True)
    for ref in (slow_back, slow.roundtrip(rows), slow.read((states, slots))):
        assert torch.equal(back.view(torch.int16), ref.view(torch.int16))
    for a, b in zip(fast.tensors, slow.tensors):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    assert fast.exps[0, 0, 0] == 127 - 3  # the boundary: 448 * 2^-3 takes scale 2^-3, not 2^-2
    monkeypatch.delenv("QIUSUO_KERNELS")
    with pytest.raises(IndexError, match="out of range"):
        fast.write((torch.tensor([4]), torch.tensor([0])), rows[:1])


@pytest.mark.parametrize("read_first", [True, False])
@pytest.mark.parametrize("cls", ["plain", "fp8"])
def test_one_pass_update_equals_its_read_and_write(cls, read_first, monkeypatch):
    """`update` (a write and a read in one C pass for FP8, the new rows back as stored after each group's reads)
    against the same component's write and read, and for FP8 against the torch formulation, bit for bit: a ring
    whose new rows take slots it reads (the order matters: read first gives the old values, read last the new),
    padding rows in a scratch state, two groups."""
    from qiusuo.quant import kernels

    if cls == "fp8" and not kernels.available():
        pytest.skip(kernels.build_error())

    def make():
        comp = Fp8Tiles((3, 6), 40, 8, "cpu", torch.float32) if cls == "fp8" else \
            CacheDtype.of("bf16").key((3, 6), 40, 8, "cpu")
        comp.write((torch.arange(18),), torch.randn(18, 40, generator=torch.Generator().manual_seed(2)))
        return comp

    rows = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(3))
    write = torch.tensor([[3, 4, 17], [9, 10, 17]])  # row 0 overwrites slot 3, which it reads; 17: the scratch
    read = torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9]])
    one, parts = make(), make()
    got = one.update((write,), rows, (read,), read_first=read_first, stored=True)
    old = parts.read((read,)) if read_first else None
    new = parts.write((write,), rows, stored=True)
    want = torch.cat([old if read_first else parts.read((read,)), new], 1)
    assert got.shape == (2, 7, 40) and torch.equal(got, want)
    assert torch.equal(one.read((torch.arange(18),)), parts.read((torch.arange(18),)))
    # slot 3, read and written by row 0: its old value read first, else the new row as stored
    assert torch.equal(got[0, 2], make().read((torch.tensor([3]),))[0] if read_first else got[0, 4])
    before = one.read((read,))
    again = one.update((write,), rows, (read,), read_first=read_first)  # without `stored`: the reads alone
    assert torch.equal(again, before)  # (the same rows written again change no slot that is read)
    none = torch.zeros(2, 0, dtype=torch.long)  # a read of no slots (V4's entries before the first is complete)
    assert one.update((write,), rows, (none,), read_first=read_first).shape == (2, 0, 40)
    assert torch.equal(one.update((write,), rows, (none,), read_first=read_first, stored=True), got[:, 4:])
    if cls == "fp8":
        monkeypatch.setenv("QIUSUO_KERNELS", "0")  # read when a component binds its storage
        slow = make()
        ref = slow.update((write,), rows, (read,), read_first=read_first, stored=True)
        assert torch.equal(got, ref)
        for a, b in zip(one.tensors, slow.tensors):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fp8_cache_decoding_is_close_to_full_precision(kind):
    """Prefill 30 tokens then decode 18 through an FP8 cache: within the measured bounds of the forward without
    a cache, and close to one prefill of all 48 through an FP8 cache (a token's key is read as stored, new or
    cached). Not bit for bit: the two compute each key with different kernels (~1e-7 apart), which can move a
    value across an e4m3 rounding boundary (one code: 1/16 relative); measured 3e-7 with AVX2 kernels, 0.0021
    (V4) under ATEN_CPU_CAPABILITY=default."""
    m = tiny(kind)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids)
        cache = ContiguousCache(m.cache_specs(), 2, 48, dtype="fp8")
        steps = torch.cat([m(ids[:, :30], cache=cache)] + [m(ids[:, t: t + 1], cache=cache) for t in range(30, 48)], 1)
        once = m(ids, cache=ContiguousCache(m.cache_specs(), 2, 48, dtype="fp8"))
    d = (steps - full).abs()
    assert d.max() < MAX_DIFF[kind] and d.mean() < MEAN_DIFF
    assert d.max() > 1e-4  # the cache really was FP8
    assert (steps - once).abs().max() < 0.01


def test_bytes_per_token_per_dtype():
    """The counting code at the published shapes (DeepSeek-V3's latent: 576 values; FP8: 512 e4m3 + 8 scales +
    64 bf16 = 648 bytes; V3.2 adds a 128-wide indexer key, 130 bytes in FP8), and what a pool allocates per
    block and per sequence state equals what the budget counts, for every kind."""
    v3, v32 = get_config("deepseek-v3"), get_config("deepseek-v3.2")
    assert cache_bytes_per_token(v3, "bf16") == 576 * 2 * 61 == 70_272
    assert cache_bytes_per_token(v3, "fp8") == 648 * 61
    assert cache_bytes_per_token(v32, "fp8") == (648 + 130) * 61
    flash = get_config("deepseek-v4-flash")
    assert cache_bytes_per_token(flash, "fp8", 1 << 20) < 0.6 * cache_bytes_per_token(flash, "bf16", 1 << 20)
    for kind in CONFIGS:
        specs = tiny(kind).cache_specs()
        for dt in ("fp32", "bf16", "fp8"):
            cd = CacheDtype.of(dt)
            states = 2 if state_bytes(specs, cd) else 0

            def allocated(blocks: int, n_states: int) -> int:
                pool = BlockPool(specs, blocks, 16, dtype=dt, num_states=n_states)
                return sum(t.nbytes for layer in pool.layers for t in layer.tensors)

            assert allocated(5, states) - allocated(3, states) == 2 * block_bytes(specs, 16, cd)
            if states:
                assert allocated(3, 3) - allocated(3, 2) == state_bytes(specs, cd)


def test_bad_cache_dtypes_are_named():
    for bad in ("fp4", "int8", torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="cache dtype"):
            CacheDtype.of(bad)
    with pytest.raises(ValueError, match="auto, bf16, fp8"):
        cache_bytes_per_token(get_config("tiny"), "e5m2")
    with pytest.raises(ValueError, match="cache dtype"):
        tiny("v3").generate(torch.zeros(1, 3, dtype=torch.long), 2, kv_cache_dtype="half-precision")
