"""Optimization (paper §4.1 "Inference and Training", paragraph "Optimization"): SGD with momentum and weight decay,
and the learning-rate schedule.

"RetinaNet is trained with stochastic gradient descent (SGD). We use synchronized SGD over 8 GPUs with a total of
16 images per minibatch (2 images per GPU). Unless otherwise specified, all models are trained for 90k iterations
with an initial learning rate of 0.01, which is then divided by 10 at 60k and again at 80k iterations. [...]
Weight decay of 0.0001 and momentum of 0.9 are used."
"""

import math

import torch
from torch import nn

PAPER_LR = 0.01  # "an initial learning rate of 0.01"
PAPER_BATCH = 16  # "a total of 16 images per minibatch"
ADAMW_LR = 3e-4  # not the paper's: see default_lr


def default_lr(optimizer: str, total_batch_size: int) -> float:
    """SGD: the paper's 0.01 at 16 images per step, scaled linearly with the total batch (Goyal et al. 2017), as
    Detectron does. AdamW, not the paper's, which trains the from-scratch demo far faster than SGD: 3e-4, as 1e-3
    makes the demo's classification subnet collapse to the prior (README, "The demo")."""
    if optimizer == "sgd":
        return PAPER_LR * total_batch_size / PAPER_BATCH
    return ADAMW_LR


def build_optimizer(
    model: nn.Module,
    optimizer: str = "sgd",
    lr: float = PAPER_LR,
    momentum: float = 0.9,  # "momentum of 0.9"
    weight_decay: float = 1e-4,  # "Weight decay of 0.0001"
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW over the model's trainable parameters.

    The paper decays every weight; its authors' code, Detectron, does not decay biases, and detectron2 does not
    decay normalisation layers (WEIGHT_DECAY_NORM = 0). Here neither is decayed: the one-dimensional parameters,
    which are exactly the biases and BatchNorm's scales and shifts.
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},  # biases, BatchNorm
    ]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if optimizer == "adamw":
        # fused: one kernel for all parameters, on the CPU too
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


def default_warmup(longest: int, total_iters: int, share: float = 0.1) -> int:
    """The recipe's warmup of `longest` iterations, or `share` of a shorter run, so that a short run still trains
    at its lr (not in the paper; Detectron warms up over 500 of 90k iterations)."""
    return min(longest, int(total_iters * share))


def default_milestones(total_iters: int) -> list[int]:
    """The paper's steps at 60k and 80k of 90k iterations, as fractions (2/3, 8/9) of any length."""
    return [total_iters * 2 // 3, total_iters * 8 // 9]


def lr_factor(
    iteration: int,
    total_iters: int,
    warmup_iters: int = 0,
    schedule: str = "step",
    milestones: list[int] | None = None,
    gamma: float = 0.1,  # "divided by 10"
) -> float:
    """Learning-rate multiplier at an iteration: a linear warmup, then the paper's steps ("divided by 10 at 60k and
    again at 80k iterations") or a cosine decay.

    The paper names no warmup. This one rises from lr / warmup_iters to lr, near detectron2's and torchvision's
    (from lr / 1000 over 1000 iterations); Detectron's rises from lr / 3 over 500 iterations, and Detectron also
    doubles the biases' lr, which this project does not (build_optimizer only exempts them from weight decay)."""
    warmup = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters else 1.0
    if schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * iteration / total_iters))
    milestones = milestones or default_milestones(total_iters)
    return warmup * gamma ** sum(iteration >= milestone for milestone in milestones)
