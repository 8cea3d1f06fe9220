"""Anchors over the feature pyramid (paper §4 "RetinaNet Detector", paragraph "Anchors").

"The anchors have areas of 32² to 512² on pyramid levels P3 to P7, respectively. [...] at each pyramid level
we use anchors at three aspect ratios {1:2, 1:1, 2:1} [...] we add anchors of sizes {2^0, 2^(1/3), 2^(2/3)} of
the original set of 3 aspect ratio anchors. [...] In total there are A = 9 anchors per level."

The sizes, scales and ratios are model settings (settings.py), the paper's by default; any number of scales and
ratios gives A = scales x ratios. Order of the R anchors of an image: level P3 -> P7, then row-major location
(y, then x), then the A anchors (aspect ratio major, scale minor, as torchvision; Detectron and detectron2 order
them scale major). The subnets flatten their outputs in exactly this order.

Sides are exact here: the P3 anchor of ratio 1:2 is 45.25 x 22.63 pixels, width by height (32·√2 by 32/√2). Detectron rounds the
sides of its stride-sized base anchor before scaling it (11 x 6 at stride 8, times 4), making it 44 x 24.
"""

import math

import torch
from torch import nn

from .settings import PYRAMID_LEVELS, ModelSettings


def base_anchors(size: float, aspect_ratios, scales, integer: bool = False) -> torch.Tensor:
    """The A = len(aspect_ratios) * len(scales) anchors of one level centred on (0, 0): (A, 4) x1y1x2y2, float64.

    An anchor of scale s and aspect ratio r (height / width) has area (s * size)² and width sqrt(area / r).
    With `integer`, as torchvision: the sides s * size are truncated to integers (32, 40, 50 on P3) and the
    corners rounded to whole pixels.
    """
    sides = torch.tensor([int(size * scale) if integer else size * scale for scale in scales], dtype=torch.float64)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    widths = (sides[None, :] / torch.sqrt(ratios[:, None])).reshape(-1)  # (A,), ratio major, scale minor
    heights = (sides[None, :] * torch.sqrt(ratios[:, None])).reshape(-1)  # (A,)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2  # (A, 4)
    return anchors.round() if integer else anchors


def grid_size(image_size: int, stride: int) -> int:
    """Feature map size at a stride: every stride-2 conv of the ResNet rounds up, so it is ceil(size / stride)."""
    return math.ceil(image_size / stride)


def shifted_anchors(base: torch.Tensor, height: int, width: int, stride: int, centre_offset: float) -> torch.Tensor:
    """Copies of the (A, 4) base anchors at every location of a height x width grid: (H*W*A, 4)."""
    xs = (torch.arange(width, dtype=base.dtype) + centre_offset) * stride  # (W,)
    ys = (torch.arange(height, dtype=base.dtype) + centre_offset) * stride  # (H,)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)


class Anchors(nn.Module):
    """The anchors of a model's settings (anchor_sizes, anchor_scales, anchor_ratios, anchor_centre_offset,
    integer_anchors) for any image size, built once per size on the CPU and copied to the device where they are used.

    The cache keeps the `max_cached` most recent (size, device) pairs: multi-scale training meets a few dozen
    padded sizes. A centre offset of 0.5 puts the anchor of cell (i, j) at ((j + 0.5) * stride, (i + 0.5) * stride),
    the centre of the cell in input pixels (Detectron, yhenon); torchvision uses 0. Integer anchors are torchvision's
    whole-pixel ones (see base_anchors).
    """

    def __init__(self, settings: ModelSettings, max_cached: int = 32):
        super().__init__()
        self.strides = tuple(2**level for level in PYRAMID_LEVELS)  # P_l has stride 2^l
        self.sizes = settings.anchor_sizes
        self.scales = settings.anchor_scales
        self.aspect_ratios = settings.anchor_ratios
        self.centre_offset = settings.anchor_centre_offset
        self.integer_anchors = settings.integer_anchors
        self.num_anchors = settings.num_anchors  # A
        self.max_cached = max_cached
        self._cache: dict[tuple, torch.Tensor] = {}

    def num_per_level(self, image_height: int, image_width: int) -> list[int]:
        """H_l * W_l * A for each level: how the R anchors of an image split into levels."""
        return [grid_size(image_height, s) * grid_size(image_width, s) * self.num_anchors for s in self.strides]

    def per_level(self, image_height: int, image_width: int) -> list[torch.Tensor]:
        """One (H_l*W_l*A, 4) float32 tensor of x1y1x2y2 anchors per pyramid level, in input pixels, on the CPU."""
        return [
            shifted_anchors(
                base_anchors(size, self.aspect_ratios, self.scales, self.integer_anchors),
                grid_size(image_height, stride), grid_size(image_width, stride), stride, self.centre_offset,
            ).float()
            for size, stride in zip(self.sizes, self.strides)
        ]

    def for_size(self, image_height: int, image_width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (R, 4) anchors of an image size on `device`: built on the CPU on the first call for the size, then
        copied once without making the host wait for the device; later calls find them cached."""
        device = torch.device(device)
        key = (image_height, image_width, device)
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))  # dicts keep insertion order: drop the oldest
            anchors = torch.cat(self.per_level(image_height, image_width))  # (R, 4)
            if device.type == "cuda":
                anchors = anchors.pin_memory()  # only pinned memory is copied asynchronously
            self._cache[key] = anchors.to(device, non_blocking=True)
        return self._cache[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The (R, 4) float32 anchors of a (B, 3, H, W) batch, on its device, also under mixed precision."""
        return self.for_size(images.shape[-2], images.shape[-1], images.device)
