"""Anchors over the feature pyramid (paper §4 "RetinaNet Detector", paragraph "Anchors").

"The anchors have areas of 32² to 512² on pyramid levels P3 to P7, respectively. [...] at each pyramid level
we use anchors at three aspect ratios {1:2, 1:1, 2:1} [...] we add anchors of sizes {2^0, 2^(1/3), 2^(2/3)} of
the original set of 3 aspect ratio anchors. [...] In total there are A = 9 anchors per level."

Order of the R anchors of an image: level P3 -> P7, then row-major location (y, then x), then the A = 9 anchors
(aspect ratio major, scale minor). The heads flatten their outputs in exactly this order.
"""

import math

import torch
from torch import nn

PYRAMID_LEVELS = (3, 4, 5, 6, 7)  # P3..P7, §4: "we construct a pyramid with levels P3 through P7"
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width, §4: "three aspect ratios {1:2, 1:1, 2:1}"
SCALES = (2**0, 2 ** (1 / 3), 2 ** (2 / 3))  # §4: "anchors of sizes {2^0, 2^(1/3), 2^(2/3)}"


def base_anchors(size: float, aspect_ratios, scales, dtype, device, integer: bool = False) -> torch.Tensor:
    """The A = len(aspect_ratios) * len(scales) anchors of one level centred on (0, 0): (A, 4) x1y1x2y2.

    An anchor of scale s and aspect ratio r (height / width) has area (s * size)² and width sqrt(area / r).
    With `integer`, as torchvision: the sides s * size are truncated to integers (32, 40, 50 on P3) and the
    corners rounded to whole pixels.
    """
    sides = [int(size * scale) if integer else size * scale for scale in scales]
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    sides = torch.as_tensor(sides, dtype=dtype, device=device)
    widths = (sides[None, :] / torch.sqrt(ratios[:, None])).reshape(-1)  # (A,), ratio major, scale minor
    heights = (sides[None, :] * torch.sqrt(ratios[:, None])).reshape(-1)  # (A,)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2  # (A, 4)
    return anchors.round() if integer else anchors


def grid_size(image_size: int, stride: int) -> int:
    """Feature map size at a stride: every stride-2 conv of the ResNet rounds up, so it is ceil(size / stride)."""
    return math.ceil(image_size / stride)


def shifted_anchors(base: torch.Tensor, height: int, width: int, stride: int, centre_offset: float) -> torch.Tensor:
    """Copies of the (A, 4) base anchors at every location of a height x width grid: (H*W*A, 4)."""
    xs = (torch.arange(width, dtype=base.dtype, device=base.device) + centre_offset) * stride  # (W,)
    ys = (torch.arange(height, dtype=base.dtype, device=base.device) + centre_offset) * stride  # (H,)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)


class Anchors(nn.Module):
    """Anchors for an image size, made on the input's device and cached per (size, device, dtype).

    The cache keeps the `max_cached` most recent sizes: multi-scale training meets a few dozen padded sizes.

    `centre_offset` = 0.5 puts the anchor of cell (i, j) at ((j + 0.5) * stride, (i + 0.5) * stride), the centre
    of the cell in input pixels (Detectron, yhenon); torchvision uses 0. `integer_anchors` gives torchvision's
    whole-pixel anchors (see base_anchors).
    """

    def __init__(
        self,
        pyramid_levels=PYRAMID_LEVELS,
        aspect_ratios=ASPECT_RATIOS,
        scales=SCALES,
        centre_offset: float = 0.5,
        integer_anchors: bool = False,
        max_cached: int = 32,
    ):
        super().__init__()
        self.pyramid_levels = tuple(pyramid_levels)
        self.strides = tuple(2**level for level in self.pyramid_levels)  # P_l has stride 2^l
        self.sizes = tuple(2 ** (level + 2) for level in self.pyramid_levels)  # §4: "areas of 32² to 512²"
        self.aspect_ratios = tuple(aspect_ratios)
        self.scales = tuple(scales)
        self.centre_offset = centre_offset
        self.integer_anchors = integer_anchors
        self.max_cached = max_cached
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    @property
    def num_anchors(self) -> int:
        """A, the number of anchors per location."""
        return len(self.aspect_ratios) * len(self.scales)

    def per_level(self, image_height: int, image_width: int, dtype=torch.float32, device=None) -> list[torch.Tensor]:
        """One (H_l*W_l*A, 4) tensor of x1y1x2y2 anchors per pyramid level, in input pixels."""
        key = (image_height, image_width, dtype, torch.device(device or "cpu"))
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))  # dicts keep insertion order: drop the oldest
            self._cache[key] = [
                shifted_anchors(
                    base_anchors(size, self.aspect_ratios, self.scales, dtype, device, self.integer_anchors),
                    grid_size(image_height, stride),
                    grid_size(image_width, stride),
                    stride,
                    self.centre_offset,
                )
                for size, stride in zip(self.sizes, self.strides)
            ]
        return self._cache[key]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level anchors for a (B, 3, H, W) batch, on its device; float32 even under mixed precision."""
        dtype = images.dtype if images.dtype == torch.float64 else torch.float32
        return self.per_level(images.shape[-2], images.shape[-1], dtype=dtype, device=images.device)
