"""Inference: scheduler, model runner, sampling, output processing, the engine, the server."""

from qiusuo.cache.pool import BlockPool, BlockTable, PagedBatch
from qiusuo.infer.constraint import Grammar, grammar, json_schema, regex
from qiusuo.infer.engine import Completion, Delta, Engine, RequestOutput, Usage
from qiusuo.infer.sampling import SamplingParams, sample

__all__ = ["BlockPool", "BlockTable", "Completion", "Delta", "Engine", "Grammar", "PagedBatch", "RequestOutput",
           "SamplingParams", "Usage", "grammar", "json_schema", "regex", "sample"]
