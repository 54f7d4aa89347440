"""Packed models in the serving engine: greedy decoding of an int4/int8 model equals the model's own `generate`
(paged, batched, and compiled: the packed matmuls are custom ops, so a compiled decoding step has no graph break),
and `load_engine` keeps a checkpoint's formats by default."""

import pytest
from torch._dynamo.utils import counters

from qiusuo.hf import save_hf
from qiusuo.infer.engine import Engine
from qiusuo.infer.load import load_engine
from qiusuo.infer.sampling import SamplingParams
from qiusuo.quant.apply import formats_of, parse_spec, quantize_model, set_activations
from greedy import unambiguous  # tests/greedy.py

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def packed(perturbed):
    model = perturbed(hidden_size=128, moe_intermediate_size=64, intermediate_size=256)
    # float32 activations: the engine's attention rounds differently from generate's by ~1e-7, which can move a q8
    # code of x (a step of ~1/127 of its block); test_formats holds q8 to its own reference
    return set_activations(quantize_model(model, parse_spec("experts=int4,shared=int8,dense=int8,attention=int8")),
                           "fp32")


def test_engine_greedy_equals_generate_on_a_packed_model(packed, tok):
    ps, refs = unambiguous(packed, tok, (5, 17, 9, 30), 12)
    eng = Engine(packed, tok, max_batch=4, block_size=4)
    assert [o.outputs[0].token_ids for o in eng.generate(ps, SamplingParams(max_tokens=12, **GREEDY))] == refs
    assert eng.pool.used_blocks == 0


def test_compiled_packed_decoding_equals_eager(packed, tok):
    ps, refs = unambiguous(packed, tok, (6, 11), 8, seed=3)
    eng = Engine(packed, tok, max_batch=2, block_size=4, compile=True)
    counters.clear()
    assert [o.outputs[0].token_ids for o in eng.generate(ps, SamplingParams(max_tokens=8, **GREEDY))] == refs
    # one graph per step: a break (a data-dependent shape in the expert dispatch was one) sends each layer through
    # its own compiled fragment with Python between them, slower than eager
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_load_engine_keeps_the_checkpoint_formats(packed, tok, tmp_path):
    save_hf(packed, tmp_path / "m", tokenizer=tok, progress=False)
    eng = load_engine(str(tmp_path / "m"), device="cpu", threads=1)
    assert formats_of(eng.model) == formats_of(packed)
    floats = load_engine(str(tmp_path / "m"), device="cpu", threads=1, quantize="none")
    assert set(formats_of(floats.model).values()) == {"float32"}
    ints = load_engine(str(tmp_path / "m"), device="cpu", threads=1, quantize="int4")
    assert formats_of(ints.model)["attention"] == "int4"  # re-quantised from the stored int8: as asked
