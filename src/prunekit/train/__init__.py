"""TRAIN: recover accuracy with masks held fixed.

- :mod:`~prunekit.train.loop`: ``finetune`` (masks enforced after every step, DDP, resumable);
- :mod:`~prunekit.train.config`: ``TrainConfig``, the training options that travel together;
- :mod:`~prunekit.train.state` / :mod:`~prunekit.train.checkpoint`: the state and its atomic checkpoints;
- :mod:`~prunekit.train.callbacks`: ``gradual_prune`` (Zhu & Gupta), ``iterative_prune``, ``GradualPruner``;
- :mod:`~prunekit.train.schedules`: sparsity schedules, pure functions of the step;
- :mod:`~prunekit.train.distill`: knowledge distillation through the same loop;
- :mod:`~prunekit.train.lottery`: lottery tickets (iterative magnitude pruning with rewinding);
- :mod:`~prunekit.train.distributed`: DDP helpers.
"""
from prunekit.train.callbacks import EvalCallback, GradualPruner, gradual_prune, iterative_prune
from prunekit.train.config import TrainConfig
from prunekit.train.distill import Distiller, distill
from prunekit.train.loop import finetune, make_optimizer
from prunekit.train.lottery import LotteryRecord, LotteryResult, lottery_ticket
from prunekit.train.schedules import SCHEDULES, make_schedule, register_schedule
from prunekit.train.state import Callback, TrainState

__all__ = ["TrainConfig", "EvalCallback", "GradualPruner", "gradual_prune", "iterative_prune", "Distiller", "distill", "finetune",
           "make_optimizer", "LotteryRecord", "LotteryResult", "lottery_ticket", "SCHEDULES", "make_schedule",
           "register_schedule", "Callback", "TrainState"]
