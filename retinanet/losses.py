"""Focal loss (paper §3.2, Eq. 5), anchor assignment (§4 "Anchors") and the RetinaNet training loss (§4.1 "Focal
Loss" and "Optimization").

Training a RetinaNet has three stages, each a function below:
1. `match_anchors`: give each anchor the ground-truth box it overlaps most, or mark it background or ignored.
2. `focal_loss` over every non-ignored anchor and class, and a box regression loss over foreground anchors.
3. Normalise both "by the number of anchors assigned to a ground-truth box" (§4.1 "Focal Loss").

Legend for shapes: B batch, R anchors over all levels, K classes, G ground-truth boxes per image (padded).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.ops import box_iou, generalized_box_iou_loss

from .boxes import decode, encode
from .settings import ModelSettings

# Match states of an anchor that is not assigned to a ground-truth box (a matched anchor holds the box's index).
BACKGROUND = -1  # IoU below bg_iou with every box: a negative for every class
IGNORED = -2  # IoU in [bg_iou, fg_iou): "ignored during training" (§4 "Anchors")
EMA_START = 100.0  # detectron2's first value of the moving average of the foreground count


class FocalLoss(torch.autograd.Function):
    """Element-wise α-balanced focal loss, paper Eq. 5, with its gradient written out: autograd would keep about
    ten intermediate tensors of the logits' size for its backward pass and walk back through each; this keeps
    one, the gradient, computed along with the loss. Use it through focal_loss."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
        z = torch.where(positive, logits, -logits)  # Eq. 2: p_t = p if y = 1 else 1 - p, i.e. p_t = sigmoid(z)
        # -log(p_t) = log(1 + exp(-z)) = max(-z, 0) + log(1 + exp(-|z|)), so that exp() never overflows. Written
        # out because torch's softplus and logsigmoid go through log1p, several times slower on CPUs.
        cross_entropy = F.relu(-z) + torch.log(1 + torch.exp(-z.abs()))
        one_minus_p_t = torch.sigmoid(-z)
        modulating_factor = one_minus_p_t**gamma  # Eq. 4: "adding a modulating factor (1 - p_t)^γ"
        alpha_t = torch.where(positive, alpha, 1 - alpha) if alpha >= 0 else 1.0  # Eq. 3: α for y = 1, 1 - α for 0
        if ctx.needs_input_grad[0]:
            # d FL / dz = -α_t (1 - p_t)^γ (γ p_t (-log p_t) + 1 - p_t), from d p_t / dz = p_t (1 - p_t);
            # dz / dx = 1 if y = 1 else -1.
            p_t = 1 - one_minus_p_t
            grad_z = -alpha_t * modulating_factor * (gamma * p_t * cross_entropy + one_minus_p_t)
            ctx.save_for_backward(torch.where(positive, grad_z, -grad_z))
        return alpha_t * modulating_factor * cross_entropy

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second derivative through it
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad_logits,) = ctx.saved_tensors
        return grad_loss * grad_logits, None, None, None


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise α-balanced focal loss, paper Eq. 5: FL(p_t) = -α_t (1 - p_t)^γ log(p_t), for targets y in
    {0, 1} (bool or float) of the logits' shape.

    Computed in logit space, so exact where a clamped probability would not be: with z = x if y = 1 else -x,
    p_t = sigmoid(z) (Eq. 2), 1 - p_t = sigmoid(-z) and -log(p_t) = log(1 + exp(-z)). alpha = 0.25 and gamma = 2
    are the paper's choice (§5.1, Table 1a/b); alpha < 0 turns the α-balancing off.
    """
    return FocalLoss.apply(logits, targets.bool(), alpha, gamma)


def match_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    fg_iou: float = 0.5,
    bg_iou: float = 0.4,
    allow_low_quality_matches: bool = True,
) -> torch.Tensor:
    """Assign the (R, 4) anchors of one image to its (G, 4) ground-truth boxes; returns (R,) int64.

    §4 "Anchors": "anchors are assigned to ground-truth object boxes using an intersection-over-union (IoU)
    threshold of 0.5; and to background if their IoU is in [0, 0.4). [...] Unassigned anchors with overlap in
    [0.4, 0.5) are ignored during training." Each entry is the index of the matched box, BACKGROUND or IGNORED.
    Boxes whose (G,) `gt_valid` flag is False (padding) match nothing.

    Low-quality matches (not in the paper; as Faster R-CNN's RPN, detectron2 and torchvision): a box that no
    anchor overlaps by fg_iou still gets the anchors it overlaps most, whatever their IoU, so that no object,
    however small or thin, is left without a positive anchor. Detectron's RetinaNet makes such matches too but
    then sets those below bg_iou back to background; yhenon/pytorch-retinanet makes none.
    """
    if gt_boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), BACKGROUND, dtype=torch.long, device=anchors.device)
    iou = box_iou(gt_boxes, anchors).masked_fill(~gt_valid[:, None], -1.0)  # (G, R)
    best_iou, matches = iou.max(dim=0)  # (R,) each: the box each anchor overlaps most
    if allow_low_quality_matches:
        best_iou_per_box = iou.max(dim=1, keepdim=True).values  # (G, 1)
        is_best_anchor = ((iou == best_iou_per_box) & (best_iou_per_box > 0)).any(dim=0)  # (R,)
        best_matches = matches.clone()
    matches[best_iou < fg_iou] = IGNORED
    matches[best_iou < bg_iou] = BACKGROUND
    if allow_low_quality_matches:
        matches = torch.where(is_best_anchor, best_matches, matches)
    return matches


def match_batch(anchors: torch.Tensor, annotations: torch.Tensor, **match_kwargs) -> torch.Tensor:
    """Match the (R, 4) anchors to each image's rows of (B, G, 5) annotations; returns (B, R) int64 row indices.

    Rows whose class is negative are padding and match nothing.
    """
    return torch.stack(
        [match_anchors(anchors, boxes[:, :4], boxes[:, 4] >= 0, **match_kwargs) for boxes in annotations]
    )  # (B, R)


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
        self.register_buffer("foreground_ema", torch.tensor(EMA_START), persistent=False)  # train.py saves it

    def normalizer(self, num_foreground: torch.Tensor) -> torch.Tensor:
        """§4.1 "Focal Loss": "normalized by the number of anchors assigned to a ground-truth box" (at least 1)."""
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
        annotations (x1, y1, x2, y2, class index; padding rows -1). Returns two scalars."""
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()  # losses in fp32 under autocast
        if annotations.shape[1] == 0:  # no boxes in the whole batch: one padding row keeps the gather valid
            annotations = F.pad(annotations, (0, 0, 0, 1), value=-1.0)  # (B, 0, 5) -> (B, 1, 5)
        matches = match_batch(anchors, annotations, **self.match_kwargs)  # (B, R)
        foreground = matches >= 0  # (B, R)
        not_ignored = matches != IGNORED  # (B, R)
        matched = torch.gather(
            annotations, 1, matches.clamp(min=0)[..., None].expand(-1, -1, annotations.shape[-1])
        )  # (B, R, 5): each anchor's box (meaningful only where foreground)
        normalizer = self.normalizer(foreground.sum().to(cls_logits.dtype))

        # Both losses are computed at every anchor and masked, not gathered through boolean masks: a gathered size
        # depends on the data, which on a GPU means waiting for it (a host-device synchronisation).
        matched_labels = torch.where(foreground, matched[..., 4].long(), BACKGROUND)  # (B, R), -1: no class
        classes = torch.arange(cls_logits.shape[-1], device=cls_logits.device)  # (K,)
        # One image at a time: a CPU's memory allocator recycles the (R, K) temporaries of one image, where those
        # of a whole (B, R, K) batch come back as fresh pages from the OS at every step (3x slower on 2 cores).
        alpha, gamma = self.settings.alpha, self.settings.gamma
        cls_loss = sum(
            (focal_loss(logits, labels[:, None] == classes, alpha, gamma).sum(dim=-1) * counted).sum()
            for logits, labels, counted in zip(cls_logits, matched_labels, not_ignored)
        )  # per image: (R, 1) == (K,) -> (R, K) one-hot targets; losses (R, K) -> (R,) -> ()
        cls_loss = cls_loss / normalizer

        # Non-foreground anchors get themselves as target box: a finite, zero-offset term that the mask drops.
        matched_boxes = torch.where(foreground[..., None], matched[..., :4], anchors)  # (B, R, 4)
        box_loss = self.regression_loss(box_deltas, anchors, matched_boxes)  # (B, R)
        return cls_loss, (box_loss * foreground).sum() / normalizer

    def regression_loss(self, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """Box loss (B, R) of (B, R, 4) predicted offsets from (R, 4) anchors against (B, R, 4) boxes."""
        std = self.settings.box_coder_std
        if self.settings.box_loss == "giou":
            predicted = decode(anchors, deltas, std)  # (B, R, 4)
            return generalized_box_iou_loss(predicted, gt_boxes, reduction="none")  # (B, R)
        targets = encode(anchors, gt_boxes, std)  # (B, R, 4)
        # §4.1 "Optimization": "the standard smooth L1 loss used for box regression"; β per the settings' box coding
        return F.smooth_l1_loss(deltas, targets, beta=self.settings.smooth_l1_beta, reduction="none").sum(dim=-1)
