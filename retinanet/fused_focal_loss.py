"""An optimisation of `losses.focal_loss` (paper §3.2, Eq. 5): the same loss, with its gradient written out as
Appendix B derives it (Eq. 10), computed in the same pass as the loss and kept for the backward pass.

Autograd would keep about ten intermediate tensors of the logits' (B, R, K) size and walk back through each; this
keeps one, the gradient, in float32. On a GPU the element-wise terms are compiled into one kernel. Tests check that
loss and gradient equal the plain form's in float64, fp16 and bf16.
"""

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def focal_loss_and_gradient(logits: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float,
                            with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 5 at each element of `logits` for bool targets `positive`, and its derivative with respect to the logits
    (None if not `with_grad`), both in float32 (float64 stays float64). The names are those of losses.focal_loss."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    x_t = torch.where(positive, x, -x)  # Appendix A: "x_t = yx", so that p_t = σ(x_t)
    cross_entropy = -F.logsigmoid(x_t)  # CE(p_t) = −log(p_t) (Eq. 2)
    one_minus_p_t = torch.sigmoid(-x_t)
    modulating_factor = one_minus_p_t**gamma  # Eq. 4: "add a modulating factor (1 − p_t)^γ to the cross entropy"
    alpha_t = torch.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0  # Eq. 3
    loss = alpha_t * modulating_factor * cross_entropy  # Eq. 5
    if not with_grad:
        return loss, None
    # Eq. 10 with α_t: ∂FL/∂x = y α_t (1 − p_t)^γ (γ p_t log(p_t) + p_t − 1), y = ±1
    grad_x_t = alpha_t * modulating_factor * (-gamma * (1 - one_minus_p_t) * cross_entropy - one_minus_p_t)
    return loss, torch.where(positive, grad_x_t, -grad_x_t)


@functools.cache
def compiled_focal_loss_and_gradient():
    """focal_loss_and_gradient compiled (for any shape) into one kernel, made on the first call."""
    return torch.compile(focal_loss_and_gradient, dynamic=True)


class FusedFocalLoss(torch.autograd.Function):
    """Element-wise focal loss whose backward pass multiplies the incoming gradient by the saved derivative.

    The derivative is saved in float32 and cast to the logits' dtype only after that product: under fp16 mixed
    precision the incoming gradient carries the loss scale, and an easy negative's own derivative (below 6e-5)
    would otherwise lose its digits, or flush to zero, before the scale reaches it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
        terms = compiled_focal_loss_and_gradient() if logits.is_cuda else focal_loss_and_gradient
        loss, grad = terms(logits, positive, alpha, gamma, with_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable  # the saved derivative is a constant: no second derivative through it
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad_loss * grad).to(ctx.logits_dtype), None, None, None


def fused_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """losses.focal_loss, computed by FusedFocalLoss: the same arguments, values and gradients."""
    return FusedFocalLoss.apply(logits, targets.bool(), alpha, gamma)
