"""Focal loss (paper §3.2, Eq. 5), anchor assignment (§4 "Anchors") and the RetinaNet training loss (§4.1 "Focal
Loss" and "Optimization").

Training a RetinaNet has three stages, each a function below:
1. `match_batch`: give each anchor the ground-truth box it overlaps most, or mark it background or ignored.
2. `focal_loss` over every non-ignored anchor and class, and a box regression loss over foreground anchors.
3. Normalise the focal loss "by the number of anchors assigned to a ground-truth box" (§4.1 "Focal Loss"), and
   the box loss by the same count (Detectron's choice: the paper names no normaliser for it).

Legend for shapes: B batch, R anchors over all levels, K classes, G ground-truth boxes per image (padded).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .boxes import batched_box_iou, decode, encode
from .fused_focal_loss import fused_focal_loss
from .settings import ModelSettings

# Match states of an anchor that is not assigned to a ground-truth box (a matched anchor holds the box's index).
BACKGROUND = -1  # IoU below bg_iou with every box: a negative for every class
IGNORED = -2  # IoU in [bg_iou, fg_iou): "ignored during training" (§4 "Anchors")
EMA_START = 100.0  # detectron2's first value of the moving average of the foreground count


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """The α-balanced focal loss of Eq. 5, FL(p_t) = −α_t (1 − p_t)^γ log(p_t), at each element of `logits`, for
    targets y in {0, 1} (bool or float) of the same shape; in float32 (float64 stays float64). alpha < 0 turns the
    α-balancing off. Gradients by autograd; RetinaNetLoss trains with fused_focal_loss.py's form of the same.

    From the logits, as §3.2 says the loss layer should ("combines the sigmoid operation for computing p with the
    loss computation, resulting in greater numerical stability"), with Appendix A's x_t.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    positive = targets.bool()
    x_t = torch.where(positive, x, -x)  # Appendix A: "x_t = yx", y ∈ {±1}, so that p_t = σ(x_t) (Eq. 2)
    cross_entropy = -F.logsigmoid(x_t)  # CE(p_t) = −log(p_t) (Eq. 2), exact even where p_t rounds to 1
    one_minus_p_t = torch.sigmoid(-x_t)  # 1 − p_t, without the cancellation of 1 − σ(x_t)
    alpha_t = torch.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0  # Eq. 3: α for y = 1, 1 − α for y = 0
    return alpha_t * one_minus_p_t**gamma * cross_entropy  # Eq. 5


def match_batch(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality_matches: bool = True,
) -> torch.Tensor:
    """Assign the (R, 4) anchors to each image's (B, G, 4) ground-truth boxes; returns (B, R) int64: the index of
    the matched box, BACKGROUND or IGNORED. Boxes whose (B, G) `gt_valid` flag is False (padding) match nothing.

    §4 "Anchors": "we use the assignment rule from RPN [28] but modified for multiclass detection and with adjusted
    thresholds. Specifically, anchors are assigned to ground-truth object boxes using an intersection-over-union
    (IoU) threshold of 0.5; and to background if their IoU is in [0, 0.4). [...] If an anchor is unassigned, which
    may happen with overlap in [0.4, 0.5), it is ignored during training."

    Low-quality matches: RPN's rule, which the paper starts from, also gives each box the anchors it overlaps most,
    whatever their IoU, so that no object, however small or thin, is left without a positive anchor; the paper
    does not say whether its modified rule keeps that part. detectron2 and torchvision keep it (the default here);
    Detectron's RetinaNet keeps those best anchors only where their IoU is at least bg_iou (0.4), resetting the
    others to background; yhenon/pytorch-retinanet makes no such matches.

    Selections are made with torch.where, never with boolean indexing: nothing here waits for the device.
    """
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


def generalized_iou_loss(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU (Rezatofighi et al. 2019) of (..., 4) x1y1x2y2 boxes, element-wise: (...). As torchvision's
    generalized_box_iou_loss, with intersections clamped at 0 rather than selected by a boolean mask, whose size
    would make the host wait for the device."""
    predicted_area = (predicted[..., 2] - predicted[..., 0]) * (predicted[..., 3] - predicted[..., 1])
    target_area = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    lower = torch.maximum(predicted[..., :2], target[..., :2])  # (..., 2)
    upper = torch.minimum(predicted[..., 2:], target[..., 2:])  # (..., 2)
    intersection = (upper - lower).clamp(min=0).prod(dim=-1)
    union = predicted_area + target_area - intersection
    hull = (torch.maximum(predicted[..., 2:], target[..., 2:]) - torch.minimum(predicted[..., :2], target[..., :2]))
    hull_area = hull.prod(dim=-1)
    return 1 - intersection / (union + eps) + (hull_area - union) / (hull_area + eps)


class RetinaNetLoss(nn.Module):
    """Classification (focal) and box regression losses of a batch, normalised by the foreground anchor count, with
    every hyperparameter from the model's settings (alpha, gamma, fg_iou, bg_iou, allow_low_quality_matches,
    box_coder_std, smooth_l1_beta, box_loss, loss_normalizer, loss_normalizer_momentum; see settings.py).

    Paper defaults throughout; two alternatives that detectron2 offers are settings:
    - box_loss="giou": generalized IoU loss on decoded boxes (Rezatofighi et al. 2019; detectron2's
      `bbox_reg_loss_type="giou"`) instead of the paper's smooth L1 on encoded offsets.
    - loss_normalizer="ema": divide by an exponential moving average of the foreground count (detectron2's
      `loss_normalizer_momentum=0.9`), steadier than the per-batch count with small batches. Under
      DistributedDataParallel the count entering the average is the mean over all processes.
    """

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.match_kwargs = dict(fg_iou=settings.fg_iou, bg_iou=settings.bg_iou,
                                 allow_low_quality_matches=settings.allow_low_quality_matches)
        # Not in the state dict: checkpoint.training_state saves it with the run's progress
        self.register_buffer("foreground_ema", torch.tensor(EMA_START), persistent=False)

    def normalizer(self, num_foreground: torch.Tensor) -> torch.Tensor:
        """§4.1 "Focal Loss": "normalized by the number of anchors assigned to a ground-truth box" (at least 1).

        The paper's count is per image; here it is that of the whole batch (as the summed losses are), clamped to
        1; torchvision divides each image's loss by its own count, Detectron by Σ(num_fg + 1) over its GPU's images.
        """
        if self.settings.loss_normalizer == "batch":
            return num_foreground.clamp(min=1)
        if self.training:
            if dist.is_available() and dist.is_initialized():
                num_foreground = num_foreground.clone()
                dist.all_reduce(num_foreground)  # the same average on every process
                num_foreground /= dist.get_world_size()
            momentum = self.settings.loss_normalizer_momentum
            self.foreground_ema.mul_(momentum).add_((1 - momentum) * num_foreground)
        return self.foreground_ema.clamp(min=1)

    def forward(
        self,
        cls_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        anchors: torch.Tensor,
        annotations: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses for (B, R, K) class logits and (B, R, 4) box offsets given (R, 4) anchors and (B, G, 5)
        annotations (x1, y1, x2, y2, class index; padding rows -1). Returns two float32 scalars."""
        # One image at a time on a CPU, whose allocator then recycles the (R, K) temporaries; the batch at once on GPUs.
        per_chunk = 1 if cls_logits.device.type == "cpu" else len(annotations)
        chunks = zip(cls_logits.split(per_chunk), box_deltas.split(per_chunk), annotations.split(per_chunk))
        cls_loss, box_loss, num_foreground = (sum(parts) for parts in zip(*(
            self.summed_losses(*chunk, anchors) for chunk in chunks)))
        normalizer = self.normalizer(num_foreground.float())
        return cls_loss / normalizer, box_loss / normalizer

    def summed_losses(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, annotations: torch.Tensor,
                      anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The focal loss summed over every anchor and class, the box loss summed over foreground anchors, and the
        number of foreground anchors, of (b, R, K) logits, (b, R, 4) deltas and (b, G, 5) annotations."""
        matches, matched, positive = self.targets(anchors, annotations, cls_logits.shape[-1])
        foreground = matches >= 0  # (b, R)
        # Both losses are computed at every anchor and masked, not gathered through boolean masks: a gathered size
        # depends on the data, which on a GPU means waiting for it (a host-device synchronisation).
        # focal_loss's values and gradients, its gradient written out: faster, one saved (b, R, K) tensor, not ten
        focal = fused_focal_loss(cls_logits, positive, self.settings.alpha, self.settings.gamma)  # (b, R, K)
        cls_loss = (focal.sum(dim=-1) * (matches != IGNORED)).sum()  # (b, R, K) -> (b, R) -> ()
        # Non-foreground anchors get themselves as target box: a finite, zero-offset term that the mask drops.
        matched_boxes = torch.where(foreground[..., None], matched[..., :4], anchors)  # (b, R, 4)
        box_loss = (self.regression_loss(box_deltas.float(), anchors, matched_boxes) * foreground).sum()
        return cls_loss, box_loss, foreground.sum()

    def targets(self, anchors: torch.Tensor, annotations: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What training asks of each anchor of (b, G, 5) annotations: its match (b, R) (a box index, BACKGROUND or
        IGNORED), that box (b, R, 5) (meaningful only where matched) and the (b, R, K) bool one-hot class targets."""
        if annotations.shape[1] == 0:  # no boxes in the whole batch: one padding row keeps the gather valid
            annotations = F.pad(annotations, (0, 0, 0, 1), value=-1.0)  # (b, 0, 5) -> (b, 1, 5)
        matches = match_batch(anchors, annotations[..., :4], annotations[..., 4] >= 0, **self.match_kwargs)  # (b, R)
        matched = torch.gather(
            annotations, 1, matches.clamp(min=0)[..., None].expand(-1, -1, annotations.shape[-1])
        )  # (b, R, 5)
        matched_labels = torch.where(matches >= 0, matched[..., 4].long(), BACKGROUND)  # (b, R), -1: no class
        classes = torch.arange(num_classes, device=annotations.device)  # (K,)
        return matches, matched, matched_labels[..., None] == classes  # (b, R, 1) == (K,) -> (b, R, K)

    def regression_loss(self, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """Box loss (B, R) of (B, R, 4) predicted offsets from (R, 4) anchors against (B, R, 4) boxes."""
        std = self.settings.box_coder_std
        if self.settings.box_loss == "giou":
            predicted = decode(anchors, deltas, std)  # (B, R, 4)
            return generalized_iou_loss(predicted, gt_boxes)  # (B, R)
        targets = encode(anchors, gt_boxes, std)  # (B, R, 4)
        # §4.1 "Optimization": "the standard smooth L1 loss used for box regression"; β per the settings' box coding
        return F.smooth_l1_loss(deltas, targets, beta=self.settings.smooth_l1_beta, reduction="none").sum(dim=-1)
