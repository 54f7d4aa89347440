"""Inference: paged latent cache, sampling, the continuous-batching engine, the OpenAI-compatible server."""

from qiusuo.infer.engine import Completion, Delta, Engine, RequestOutput, Usage
from qiusuo.infer.paged_cache import BlockPool, BlockTable, PagedBatch
from qiusuo.infer.sampling import SamplingParams, sample

__all__ = ["BlockPool", "BlockTable", "Completion", "Delta", "Engine", "PagedBatch", "RequestOutput",
           "SamplingParams", "Usage", "sample"]
