"""Training (SPEC 1.1, paper section 3): the one loop, objectives, fault-tolerant checkpoints, recipes,
pre-training with the long-context stage, and the speedrun.

    from qwen2.train import Trainer, TrainConfig, next_token_loss, linear_cross_entropy
"""

from qwen2.train.loop import TrainConfig, Trainer, lr_at, param_groups
from qwen2.train.losses import linear_cross_entropy
from qwen2.train.objectives import next_token_loss, token_losses

__all__ = [
    "Trainer",
    "TrainConfig",
    "lr_at",
    "param_groups",
    "linear_cross_entropy",
    "next_token_loss",
    "token_losses",
]
