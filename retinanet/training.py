"""One training step (paper §4.1 "Optimization": "The training loss is the sum the focal loss and the standard
smooth L1 loss used for box regression"), written so that the device never waits for the host until the step's
one read, after the backward pass.

That read brings back together everything the host needs to decide about the step: the two losses, whether any
process's loss is not finite or any process was asked to stop (agreed by all processes of a distributed run, so
that they skip and stop together), and whether fp16 gradients overflowed. A step with a non-finite loss or
overflowed gradients updates no weight.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


class StepResult(NamedTuple):
    classification_loss: float
    regression_loss: float
    nonfinite: bool  # the loss of some process was NaN or infinite: the step updated nothing
    stop: bool  # some process was asked to stop


@contextlib.contextmanager
def out_of_memory_hint(batch_shape: torch.Size):
    """Turn a GPU out-of-memory error into a message that names the batch and says what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        batch_size, _, height, width = batch_shape
        raise SystemExit(
            f"error: out of GPU memory on a batch of {batch_size} images of {height}x{width} pixels (padded). Lower "
            f"--batch_size (the default lr scales with it), or --min_size and --max_size; mixed precision, the default "
            f"on GPU, needs less memory than --full_precision. ({str(error).splitlines()[0]})"
        ) from error


class TrainStep:
    """Forward, backward and optimizer step of a model whose forward returns (classification, regression) losses.

    `amp_dtype` is the autocast dtype of mixed precision (None: full precision); the scaler scales fp16 losses;
    `clip_grad` is the largest gradient norm (None: no clipping).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, clip_grad: float | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.amp_dtype, self.clip_grad = device, amp_dtype, clip_grad
        self.flags = torch.zeros(2, device=device)  # (stop requested, loss not finite), the same on every process

    def __call__(self, images: torch.Tensor, annotations: torch.Tensor, stop_requested: bool) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        with out_of_memory_hint(images.shape):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                cls_loss, box_loss = self.model(images, annotations)
            self.scaler.scale(cls_loss + box_loss).backward()
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
        """1 if the fp16 gradients of this step overflowed, as GradScaler found while unscaling them, else 0: the
        very value GradScaler.step would read, read here with the losses rather than on its own."""
        if not self.scaler.is_enabled():
            return self.flags.new_zeros(())
        return sum(self.scaler._found_inf_per_device(self.optimizer).values()).float()
