"""Box coding: regression targets relative to anchors (paper §3.3 "RetinaNet Detector", box regression as in R-CNN).

The regression subnet predicts, for each anchor, the offset (dx, dy, dw, dh) from the anchor to its matched
ground-truth box. The paper follows the standard R-CNN parameterisation:

    dx = (gx - ax) / aw,   dy = (gy - ay) / ah,   dw = log(gw / aw),   dh = log(gh / ah)

with (ax, ay, aw, ah) the anchor's centre and size and (gx, gy, gw, gh) the box's. Each offset is then divided
by a fixed standard deviation (0.1, 0.1, 0.2, 0.2) so the four targets have roughly unit variance; this is what
Detectron, yhenon/pytorch-retinanet and torchvision (as weights 10, 10, 5, 5) all do.
"""

import math

import torch

# Standard deviations of (dx, dy, dw, dh), as in Detectron's BBOX_REG_WEIGHTS = (10, 10, 5, 5).
BOX_CODER_STD = (0.1, 0.1, 0.2, 0.2)
# Largest dw/dh that decoding lets through exp(): a box at most 1000/16 times its anchor, as in Detectron.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split (..., 4) x1y1x2y2 boxes into centre x, centre y, width and height, each (...)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(anchors: torch.Tensor, boxes: torch.Tensor, std: tuple[float, ...] = BOX_CODER_STD) -> torch.Tensor:
    """Regression targets (..., 4) that move `anchors` (..., 4) onto `boxes` (..., 4), both x1y1x2y2."""
    ax, ay, aw, ah = centre_size(anchors)
    gx, gy, gw, gh = centre_size(boxes)
    deltas = torch.stack(
        [(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=-1
    )  # (..., 4)
    return deltas / deltas.new_tensor(std)


def decode(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    std: tuple[float, ...] = BOX_CODER_STD,
    max_log_scale: float = MAX_LOG_SCALE,
) -> torch.Tensor:
    """Boxes (..., 4) x1y1x2y2 obtained by applying `deltas` (..., 4) to `anchors` (..., 4); inverse of encode.

    dw and dh are clamped to `max_log_scale` so that an untrained network cannot overflow exp().
    """
    ax, ay, aw, ah = centre_size(anchors)
    deltas = deltas * deltas.new_tensor(std)
    dx, dy, dw, dh = deltas.unbind(dim=-1)
    cx = ax + dx * aw
    cy = ay + dy * ah
    w = aw * torch.exp(dw.clamp(max=max_log_scale))
    h = ah * torch.exp(dh.clamp(max=max_log_scale))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4)
