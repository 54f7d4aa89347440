"""Hugging Face checkpoints in and out: `load_model`, `load_tokenizer`, `save_hf`, name mapping, FP8 blocks, FP4
experts."""

from qiusuo.hf.fp4 import dequantize_fp4, quantize_fp4
from qiusuo.hf.fp8 import dequantize_blocks, quantize_blocks
from qiusuo.hf.load import load_model, load_tokenizer, read_config
from qiusuo.hf.names import from_hf_state_dict, hf_layout, to_hf_state_dict
from qiusuo.hf.save import save_hf
from qiusuo.io import CheckpointError

__all__ = ["CheckpointError", "dequantize_blocks", "dequantize_fp4", "from_hf_state_dict", "quantize_fp4", "hf_layout", "load_model", "load_tokenizer",
           "quantize_blocks", "read_config", "save_hf", "to_hf_state_dict"]
