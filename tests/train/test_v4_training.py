"""DeepSeek-V4 through the one training core: `qiusuo train --config pretrain-v4-tiny` learns, balances its
score-routed layers (never the hash-routed ones) and samples through the serving engine.
Its exact resume is `tests/train/test_trainer.py::test_resume_equals_uninterrupted_run_bitwise[pretrain-v4-tiny]`."""

import pytest
import torch

from qiusuo.data.prepare import prepare
from qiusuo.model.moe import HashRouter, moe_routers
from qiusuo.train.config import load_run_config
from qiusuo.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("v4_data")
    prepare(out, max_bytes=150_000, vocab_size=512, val_fraction=0.03, progress=False)
    return out


def v4_cfg(data_dir, out_dir, **overrides):
    base = {"data.dir": str(data_dir), "run.out_dir": str(out_dir), "run.progress": False, "run.threads": 1,
            "data.batch_size": 4, "data.seq_len": 48, "train.steps": 12, "train.log_every": 1,
            "schedule.warmup_steps": 3, "eval.every": 0, "eval.batches": 2, "eval.sample_tokens": 4,
            "eval.prompts": ["def "], "checkpoint.every": 0, "balance.gamma": 0.01}
    return load_run_config("pretrain-v4-tiny", {**base, **overrides})


def test_v4_run_learns_balances_and_samples(data_dir, tmp_path):
    cfg = v4_cfg(data_dir, tmp_path / "run", **{"train.steps": 30, "optim.lr": 1e-2})
    trainer = Trainer(cfg)
    assert trainer.model.cfg.is_v4
    before = trainer.evaluate()
    hashed = [m for m in trainer.model.modules() if isinstance(m, HashRouter)]
    tables = [h.tid2eid.clone() for h in hashed]
    summary = trainer.train()
    assert summary["val_loss"] < before.loss - 0.5, (before, summary)
    assert isinstance(summary["samples"][0]["text"], str)  # sampled by the serving engine over paged V4 caches
    assert all(torch.equal(h.tid2eid, t) for h, t in zip(hashed, tables))  # hash tables are fixed
    assert all(r.e_score_correction_bias.abs().sum() > 0 for r in moe_routers(trainer.model))  # balanced
