"""`qiusuo inspect --load` tells the truth: the resident memory of a model loaded as `qiusuo serve` loads it (int4
here, from a float32 checkpoint) is its prediction (the loader's own plan on the meta device, plus the engine's
cache) within 5%, once the one-off costs of a first load (imports, the kernel library, allocator arenas) are paid;
and the table's formats are the ones `--quantize` runs."""

import json
import subprocess
import sys

import pytest
import torch

import qiusuo
from qiusuo.bench.common import bench_tokenizer

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from qiusuo.infer.load import measure_load
torch.set_num_threads(1)
measure_load(Path(sys.argv[2]), "int4", None, 1, 64)  # warm-up: imports, kernels, arenas
print(json.dumps(measure_load(Path(sys.argv[1]), "int4", None, 1, 64)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_resident_memory_after_loading_matches_the_prediction(tmp_path):
    tok = bench_tokenizer()
    cfg = qiusuo.get_config("bench", vocab_size=4096, hidden_size=768, moe_intermediate_size=768, num_hidden_layers=4,
                            n_routed_experts=32, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    qiusuo.save_hf(qiusuo.Transformer(cfg), tmp_path / "big", tokenizer=tok, progress=False)
    qiusuo.save_hf(qiusuo.Transformer(qiusuo.get_config("tiny", vocab_size=tok.vocab_size)), tmp_path / "small",
                   tokenizer=tok, progress=False)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"resident {m['resident'] / 2**20:.1f} MiB, predicted {(m['predicted_weights'] + m['predicted_cache']) / 2**20:.1f}"
          f" MiB: {m['resident_over_predicted']:.3f}; peak {m['peak'] / 2**20:.1f} MiB")
    assert m["predicted_weights"] > 100 * 2**20
    assert 0.95 <= m["resident_over_predicted"] <= 1.05
