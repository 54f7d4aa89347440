"""qiusuo: DeepSeek-V2/V3-architecture models (MLA + DeepSeekMoE + MTP), defined, trained, interoperated, served.

This is the package face for users; qiusuo's own modules never import it (they import where things are defined).
"""

from qiusuo.config import PRESETS, ModelConfig, get_config
from qiusuo.hf import load_model, load_tokenizer, save_hf
from qiusuo.model.count import count_params
from qiusuo.model.transformer import LossOutput, Transformer

__all__ = ["PRESETS", "ModelConfig", "count_params", "get_config", "LossOutput", "Transformer", "load_model", "load_tokenizer", "save_hf"]
