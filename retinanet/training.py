"""What train.py's loop steps with (paper §4.1 "Optimization"): the optimizer, the learning-rate schedule, one
training step, and where a run executes (device, processes, mixed precision, a clean stop).

"RetinaNet is trained with stochastic gradient descent (SGD). We use synchronized SGD over 8 GPUs with a total of
16 images per minibatch (2 images per GPU). Unless otherwise specified, all models are trained for 90k iterations
with an initial learning rate of 0.01, which is then divided by 10 at 60k and again at 80k iterations. [...]
Weight decay of 0.0001 and momentum of 0.9 are used. The training loss is the sum the focal loss and the standard
smooth L1 loss used for box regression."

A step never makes the device wait for the host until its one read, after the backward pass, which brings back
together all the host needs to decide about the step: the two losses, whether any process's loss is not finite or
any process was asked to stop (agreed by all processes, so that they skip and stop together), and whether fp16
gradients overflowed. A step with a non-finite loss or overflowed gradients updates no weight.
"""

import contextlib
import datetime
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .settings import resolve_device

PAPER_LR = 0.01  # "an initial learning rate of 0.01"
PAPER_BATCH = 16  # "a total of 16 images per minibatch"
PAPER_MOMENTUM = 0.9  # "momentum of 0.9"
PAPER_WEIGHT_DECAY = 1e-4  # "Weight decay of 0.0001"
ADAMW_LR = 3e-4  # not the paper's: see default_lr
REPORTS_PER_RUN = 20  # a run of many short epochs evaluates and saves last.pt about this many times
# How long a process waits for the others in a collective operation: NCCL's default of 10 minutes is shorter than
# some things one process does alone (the first writing a checkpoint to slow storage, scoring COCO).
DISTRIBUTED_TIMEOUT = datetime.timedelta(minutes=60)


# ------------------------------------------------------------------------------------------------ optimizer


def default_lr(optimizer: str, total_batch_size: int) -> float:
    """SGD: the paper's 0.01 at 16 images a step, scaled linearly with the total batch (Goyal et al. 2017), as
    Detectron does; AdamW, the demo's (docs/demo.md), 3e-4."""
    return PAPER_LR * total_batch_size / PAPER_BATCH if optimizer == "sgd" else ADAMW_LR


def build_optimizer(model: nn.Module, optimizer: str = "sgd", lr: float = PAPER_LR, momentum: float = PAPER_MOMENTUM,
                    weight_decay: float = PAPER_WEIGHT_DECAY) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW over the model's trainable parameters. The paper decays every weight;
    its authors' code, Detectron, does not decay biases, and detectron2 does not decay normalisation layers. Here
    neither is decayed: the one-dimensional parameters, which are exactly the biases and BatchNorm's."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},  # biases, BatchNorm
    ]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)  # fused: one kernel for all parameters, the CPU's too
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


# ------------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """A run's length, learning-rate course and cadence, fixed once the length of an epoch is known."""

    total_iters: int
    iters_per_epoch: int
    warmup_iters: int
    milestones: tuple[int, ...]  # the iterations of the lr steps
    lr_schedule: str = "step"  # the paper's steps, or "cosine"
    lr_step_factor: float = 0.1  # "divided by 10"
    eval_every: int = 1  # epochs between evaluations (0: never)
    save_every: int = 1  # epochs between saves of last.pt

    @property
    def epochs(self) -> int:
        """The epochs the run starts; the last may stop short, at total_iters."""
        return math.ceil(self.total_iters / self.iters_per_epoch)

    def lr_factor(self, iteration: int) -> float:
        """The lr multiplier at an iteration: a linear warmup from lr / warmup_iters (not in the paper; detectron2's
        from lr / 1000 over 1000), then the paper's steps ("divided by 10 at 60k and again at 80k") or a cosine."""
        warmup = min(1.0, (iteration + 1) / self.warmup_iters) if self.warmup_iters else 1.0
        if self.lr_schedule == "cosine":
            return warmup * 0.5 * (1 + math.cos(math.pi * iteration / self.total_iters))
        return warmup * self.lr_step_factor ** sum(iteration >= milestone for milestone in self.milestones)

    def describe(self, lr: float) -> str:
        """The schedule in a line, and a warning if the lr never reaches `lr` (the warmup outlasts a step)."""
        steps = self.milestones if self.lr_schedule == "step" else ()
        course = (f"multiplied by {self.lr_step_factor:g} at iteration{'s' * (len(steps) > 1)} "
                  f"{' and '.join(map(str, steps))}" if steps else f"then a cosine decay to 0 at iteration {self.total_iters}")
        evaluation = f"validation every {self.eval_every} epoch(s)" if self.eval_every else "no validation"
        line = (f"schedule: {self.total_iters} iterations ({self.total_iters / self.iters_per_epoch:.3g} epochs of "
                f"{self.iters_per_epoch}), lr {lr:g} after a linear warmup of {self.warmup_iters} iterations, "
                f"{course}; {evaluation}, last.pt every {self.save_every} epoch(s)")
        if self.warmup_iters <= min([self.total_iters, *steps]):
            return line
        outlasts = "the run" if self.warmup_iters > self.total_iters else "the run's first lr step"
        peak = max(self.lr_factor(iteration) for iteration in range(self.total_iters))
        return (f"{line}\nwarning: the warmup of {self.warmup_iters} iterations is longer than {outlasts} "
                f"({self.total_iters} iterations, lr steps at {', '.join(map(str, steps)) or 'none'}): the lr never "
                f"reaches {lr:g}, at most {lr * peak:.3g}; training goes on")


def plan_schedule(iters_per_epoch: int, epochs: int | None, iters: int | None, warmup_iters: int,
                  shorten_warmup: bool, milestones: list[int] | None, lr_schedule: str = "step",
                  lr_step_factor: float = 0.1, eval_every: int | None = None) -> Schedule:
    """`iters` or `epochs` long; a warmup of at most a tenth of the run if `shorten_warmup`; the lr steps at
    `milestones` or at the paper's 2/3 and 8/9 (60k and 80k of 90k); reports every epoch, or REPORTS_PER_RUN times."""
    total_iters = iters or epochs * iters_per_epoch
    warmup_iters = min(warmup_iters, int(total_iters * 0.1)) if shorten_warmup else warmup_iters
    save_every = max(1, math.ceil(total_iters / iters_per_epoch) // REPORTS_PER_RUN)
    return Schedule(total_iters, iters_per_epoch, warmup_iters,
                    tuple(milestones or (total_iters * 2 // 3, total_iters * 8 // 9)), lr_schedule, lr_step_factor,
                    save_every if eval_every is None else eval_every, save_every)


# ----------------------------------------------------------------------------------------------------- step


class StepResult(NamedTuple):
    classification_loss: float
    regression_loss: float
    nonfinite: bool  # the loss of some process was NaN or infinite: the step updated nothing
    stop: bool  # some process was asked to stop


def out_of_memory(batch_shape: torch.Size, error: torch.OutOfMemoryError) -> str:
    """The message of a GPU out-of-memory error: the batch, and what to lower."""
    batch_size, _, height, width = batch_shape
    return (f"error: out of GPU memory on a batch of {batch_size} images of {height}x{width} pixels (padded). Lower "
            f"--batch_size (the default lr scales with it), or --min_size and --max_size; mixed precision, the "
            f"default on GPU, needs less memory than --full_precision. ({str(error).splitlines()[0]})")


class TrainStep:
    """Forward, backward and optimizer step of a model whose forward returns (classification, regression) losses.
    `amp_dtype` is the autocast dtype of mixed precision (None: full precision); the scaler scales fp16 losses;
    `clip_grad` is the largest gradient norm (None: no clipping)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, clip_grad: float | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.amp_dtype, self.clip_grad = device, amp_dtype, clip_grad
        self.flags = torch.zeros(2, device=device)  # (stop requested, loss not finite), the same on every process

    def __call__(self, images: torch.Tensor, annotations: torch.Tensor, stop_requested: bool) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                cls_loss, box_loss = self.model(images, annotations)
            self.scaler.scale(cls_loss + box_loss).backward()  # "the sum the focal loss and the [...] smooth L1 loss"
        except torch.OutOfMemoryError as error:
            raise SystemExit(out_of_memory(images.shape, error)) from error
        self.scaler.unscale_(self.optimizer)  # gradients at their true scale for clipping; overflow found on device
        if self.clip_grad:
            nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                     self.clip_grad)
        self.flags[0].fill_(float(stop_requested))
        self.flags[1] = (~torch.isfinite(cls_loss.detach() + box_loss.detach())).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        read = torch.stack([cls_loss.detach().float(), box_loss.detach().float(), *self.flags, self.overflowed()])
        cls_value, box_value, stop, nonfinite, overflowed = read.tolist()  # the one wait for the device
        if not (nonfinite or overflowed):
            self.optimizer.step()
        self.scaler.update()
        return StepResult(cls_value, box_value, bool(nonfinite), bool(stop))

    def overflowed(self) -> torch.Tensor:
        """1 if the fp16 gradients overflowed, as GradScaler found while unscaling them (GradScaler.step's read)."""
        if not self.scaler.is_enabled():
            return self.flags.new_zeros(())
        return sum(self.scaler._found_inf_per_device(self.optimizer).values()).float()


def nonfinite_loss(result: StepResult, iteration: int, lr: float, skip: bool, output_dir: str, skipped: int) -> str:
    """What a step with a non-finite loss means: with `skip`, a line that counts it; otherwise the end of the run,
    with a message that says what to try (SystemExit)."""
    where = (f"at iteration {iteration} (lr {lr:.3g}, classification {result.classification_loss}, regression "
             f"{result.regression_loss})")
    if not skip:
        raise SystemExit(f"error: the loss is not finite {where}. Try a lower --lr, a longer --warmup_iters or "
                         f"--clip_grad 10, or --skip_nonfinite to skip such batches; {output_dir}/last.pt holds the "
                         f"last checkpoint.")
    return f"skipped a batch: the loss is not finite {where}; {skipped} skipped so far"


# ---------------------------------------------------------------------------------------------------- runtime


def setup_distributed(device_name: str | None = None) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun, one process per GPU (NCCL) or CPU process (gloo)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = resolve_device(device_name)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return device, rank, world_size


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 on a GPU (NVIDIA's retinanet-examples), bf16 on a CPU with bf16 instructions, else None."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


class StopRequest:
    """A signal handler for Ctrl-C (SIGINT) and SIGTERM: the first asks the training loop to stop after the current
    step and save a checkpoint there; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest):
    """Let Ctrl-C and SIGTERM (sent by schedulers before they kill a job) request a clean stop while inside."""
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def scalar_writer(logdir: str | None) -> Callable[[int, dict], None]:
    """log(iteration, {name: value}): TensorBoard scalars written into logdir, or nothing without one."""
    if logdir is None:
        return lambda iteration, values: None
    from torch.utils.tensorboard import SummaryWriter  # only when asked for

    writer = SummaryWriter(logdir)
    return lambda iteration, values: [writer.add_scalar(name, value, iteration) for name, value in values.items()]
