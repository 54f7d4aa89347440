"""Training: run config, AdamW and schedules, atomic checkpoints, metrics and plots, the loop, `qiusuo train`."""

from qiusuo.train.config import RunConfig, load_run_config
from qiusuo.train.trainer import Trainer, TrainingDiverged

__all__ = ["RunConfig", "load_run_config", "Trainer", "TrainingDiverged"]
