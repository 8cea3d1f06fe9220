"""Focal loss (paper §3.2, Eq. 5), anchor assignment (§4 "Anchors") and the RetinaNet training loss (§4.1 "Focal
Loss" and "Optimization").

Training a RetinaNet has three stages, each a function below:
1. `label_anchors` (with `match_batch`): give each anchor the ground-truth box it overlaps most, or mark it
   background or ignored, and its one-hot class targets.
2. `focal_loss` over every non-ignored anchor and class, and a box regression loss over foreground anchors.
3. Normalise the focal loss "by the number of anchors assigned to a ground-truth box" (§4.1 "Focal Loss"), and
   the box loss by the same count (Detectron's choice: the paper names no normaliser for it), in `retinanet_loss`.

§4 "Anchors": "we use the assignment rule from RPN [28] but modified for multiclass detection and with adjusted
thresholds. Specifically, anchors are assigned to ground-truth object boxes using an intersection-over-union (IoU)
threshold of 0.5; and to background if their IoU is in [0, 0.4). [...] If an anchor is unassigned, which may happen
with overlap in [0.4, 0.5), it is ignored during training."

Low-quality matches: RPN's rule, which the paper starts from, also gives each box the anchors it overlaps most,
whatever their IoU; the paper does not say whether its modified rule keeps that part. detectron2 and torchvision keep
it (allow_low_quality_matches, the default); Detectron keeps those of IoU >= bg_iou only; yhenon/pytorch-retinanet
makes none.

`fused_focal_loss` is an optimisation of `focal_loss`, beside it: the same loss, its gradient written out as Appendix
B derives it (Eq. 10) in the same pass and kept for the backward pass, where autograd keeps about ten tensors of
the logits' size. On a GPU its element-wise terms are compiled into one kernel. Tests hold both equal in float64,
fp16 and bf16; the loss trains with the fused one.

Legend for shapes: B batch, R anchors over all levels, K classes, G ground-truth boxes per image (padded).
"""

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .anchors import batched_box_iou, decode, encode
from .settings import ModelSettings

# Match states of an anchor that is not assigned to a ground-truth box (a matched anchor holds the box's index).
BACKGROUND = -1  # IoU below bg_iou with every box: a negative for every class
IGNORED = -2  # IoU in [bg_iou, fg_iou): "ignored during training" (§4 "Anchors")
EMA_START = 100.0  # detectron2's first value of the moving average of the foreground count


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """The α-balanced focal loss of Eq. 5, FL(p_t) = −α_t (1 − p_t)^γ log(p_t), at each element of `logits`, for
    targets y in {0, 1} (bool or float) of the same shape; in float32 (float64 stays float64). alpha < 0 turns the
    α-balancing off. From the logits, as §3.2 asks ("combines the sigmoid operation for computing p with the loss
    computation, resulting in greater numerical stability"), with Appendix A's x_t."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    positive = targets.bool()
    x_t = torch.where(positive, x, -x)  # Appendix A: "x_t = yx", y ∈ {±1}, so that p_t = σ(x_t) (Eq. 2)
    cross_entropy = -F.logsigmoid(x_t)  # CE(p_t) = −log(p_t) (Eq. 2), exact even where p_t rounds to 1
    one_minus_p_t = torch.sigmoid(-x_t)  # 1 − p_t, without the cancellation of 1 − σ(x_t)
    alpha_t = torch.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0  # Eq. 3: α for y = 1, 1 − α for y = 0
    return alpha_t * one_minus_p_t**gamma * cross_entropy  # Eq. 5


def focal_loss_and_gradient(logits: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float,
                            with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """focal_loss for bool targets `positive`, and its derivative (None without `with_grad`): float32."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    x_t = torch.where(positive, x, -x)
    cross_entropy = -F.logsigmoid(x_t)
    one_minus_p_t = torch.sigmoid(-x_t)
    modulating_factor = one_minus_p_t**gamma  # Eq. 4: "add a modulating factor (1 − p_t)^γ to the cross entropy"
    alpha_t = torch.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0
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
    """Element-wise focal loss whose backward pass multiplies the incoming gradient by the saved derivative. That is
    kept in float32 until the product: under fp16 the incoming gradient carries the loss scale, and an easy
    negative's own derivative (below 6e-5) would otherwise lose its digits, or flush to zero, before the scale
    reaches it."""

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
    """focal_loss, computed by FusedFocalLoss: the same arguments, values and gradients."""
    return FusedFocalLoss.apply(logits, targets.bool(), alpha, gamma)


def match_batch(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor, fg_iou: float = 0.5,
                bg_iou: float = 0.4, allow_low_quality_matches: bool = True) -> torch.Tensor:
    """(B, R) int64: each anchor's box among (B, G, 4), BACKGROUND or IGNORED (§4 "Anchors"); boxes whose (B, G)
    `gt_valid` is False match nothing. With torch.where, never boolean indexing: nothing waits for the device."""
    if gt_boxes.shape[1] == 0:
        return torch.full(gt_boxes.shape[:1] + anchors.shape[:1], BACKGROUND, dtype=torch.long, device=anchors.device)
    iou = batched_box_iou(gt_boxes, anchors).masked_fill(~gt_valid[..., None], -1.0)  # (B, G, R)
    best_iou, best_box = iou.max(dim=1)  # (B, R) each: the box each anchor overlaps most
    matches = torch.where(best_iou >= fg_iou, best_box, torch.where(best_iou >= bg_iou, IGNORED, BACKGROUND))
    if allow_low_quality_matches:
        best_iou_per_box = iou.max(dim=2, keepdim=True).values  # (B, G, 1)
        is_best_anchor = ((iou == best_iou_per_box) & (best_iou_per_box > 0)).any(dim=1)  # (B, R)
        matches = torch.where(is_best_anchor, best_box, matches)
    return matches


def label_anchors(anchors: torch.Tensor, annotations: torch.Tensor,
                  settings: ModelSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor's match (B, R), matched box (B, R, 5) and (B, R, K) bool one-hot class targets."""
    if annotations.shape[1] == 0:  # no boxes in the whole batch: one padding row keeps the gather valid
        annotations = F.pad(annotations, (0, 0, 0, 1), value=-1.0)  # (B, 0, 5) -> (B, 1, 5)
    matches = match_batch(anchors, annotations[..., :4], annotations[..., 4] >= 0, settings.fg_iou, settings.bg_iou,
                          settings.allow_low_quality_matches)  # (B, R)
    matched = torch.gather(
        annotations, 1, matches.clamp(min=0)[..., None].expand(-1, -1, annotations.shape[-1])
    )  # (B, R, 5)
    matched_labels = torch.where(matches >= 0, matched[..., 4].long(), BACKGROUND)  # (B, R), -1: no class
    classes = torch.arange(settings.num_classes, device=annotations.device)  # (K,)
    return matches, matched, matched_labels[..., None] == classes  # (B, R, 1) == (K,) -> (B, R, K)


def generalized_iou_loss(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU (Rezatofighi et al. 2019) of (..., 4) x1y1x2y2 boxes, element-wise: (...). As torchvision's
    generalized_box_iou_loss, with intersections clamped at 0 rather than selected by a boolean mask."""
    predicted_area = (predicted[..., 2] - predicted[..., 0]) * (predicted[..., 3] - predicted[..., 1])
    target_area = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    lower = torch.maximum(predicted[..., :2], target[..., :2])  # (..., 2)
    upper = torch.minimum(predicted[..., 2:], target[..., 2:])  # (..., 2)
    intersection = (upper - lower).clamp(min=0).prod(dim=-1)
    union = predicted_area + target_area - intersection
    hull = (torch.maximum(predicted[..., 2:], target[..., 2:]) - torch.minimum(predicted[..., :2], target[..., :2]))
    hull_area = hull.prod(dim=-1)
    return 1 - intersection / (union + eps) + (hull_area - union) / (hull_area + eps)


def regression_loss(deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor,
                    settings: ModelSettings) -> torch.Tensor:
    """Box loss (B, R) of (B, R, 4) predicted offsets from (R, 4) anchors against (B, R, 4) boxes."""
    std = settings.box_coder_std
    if settings.box_loss == "giou":  # detectron2's alternative: generalized IoU on decoded boxes
        return generalized_iou_loss(decode(anchors, deltas, std), gt_boxes)  # (B, R)
    targets = encode(anchors, gt_boxes, std)  # (B, R, 4)
    # §4.1 "Optimization": "the standard smooth L1 loss used for box regression"; β per the settings' box coding
    return F.smooth_l1_loss(deltas, targets, beta=settings.smooth_l1_beta, reduction="none").sum(dim=-1)


def summed_losses(cls_logits: torch.Tensor, box_deltas: torch.Tensor, annotations: torch.Tensor, anchors: torch.Tensor,
                  settings: ModelSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal loss over all anchors and classes, box loss over foreground anchors, and their count."""
    matches, matched, positive = label_anchors(anchors, annotations, settings)
    foreground = matches >= 0  # (b, R)
    # Both losses are computed at every anchor and masked, not gathered through boolean masks: a gathered size
    # depends on the data, which on a GPU means waiting for it (a host-device synchronisation).
    focal = fused_focal_loss(cls_logits, positive, settings.focal_alpha, settings.focal_gamma)  # (b, R, K)
    cls_loss = (focal.sum(dim=-1) * (matches != IGNORED)).sum()  # (b, R, K) -> (b, R) -> ()
    # Non-foreground anchors get themselves as target box: a finite, zero-offset term that the mask drops.
    matched_boxes = torch.where(foreground[..., None], matched[..., :4], anchors)  # (b, R, 4)
    box_loss = (regression_loss(box_deltas.float(), anchors, matched_boxes, settings) * foreground).sum()
    return cls_loss, box_loss, foreground.sum()


def moving_average(num_foreground: torch.Tensor, foreground_ema: torch.Tensor, momentum: float,
                   update: bool) -> torch.Tensor:
    """detectron2's moving average of the foreground count (loss_normalizer "ema"), updated in place when `update`
    with the mean count over all processes of a distributed run."""
    if update:
        if dist.is_available() and dist.is_initialized():
            num_foreground = num_foreground.clone()
            dist.all_reduce(num_foreground)  # the same average on every process
            num_foreground /= dist.get_world_size()
        foreground_ema.mul_(momentum).add_((1 - momentum) * num_foreground)
    return foreground_ema.clone()


def retinanet_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                   annotations: torch.Tensor, settings: ModelSettings, foreground_ema: torch.Tensor,
                   update_ema: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification (focal) and box losses of (B, R, K) logits and (B, R, 4) deltas: float32 scalars."""
    # One image at a time on a CPU, whose allocator then recycles the (R, K) temporaries; the batch at once on GPUs.
    per_chunk = 1 if cls_logits.device.type == "cpu" else len(annotations)
    chunks = zip(cls_logits.split(per_chunk), box_deltas.split(per_chunk), annotations.split(per_chunk))
    cls_loss, box_loss, num_foreground = (sum(parts) for parts in zip(*(
        summed_losses(*chunk, anchors, settings) for chunk in chunks)))
    if settings.loss_normalizer == "ema":
        num_foreground = moving_average(num_foreground.float(), foreground_ema, settings.loss_normalizer_momentum,
                                        update_ema)
    # §4.1 "Focal Loss": "normalized by the number of anchors assigned to a ground-truth box" (at least one), here of
    # the whole batch, as the summed losses are (torchvision: each image's own; Detectron: Σ(num_fg + 1) on a GPU)
    normalized_by = num_foreground.float().clamp(min=1)
    return cls_loss / normalized_by, box_loss / normalized_by
