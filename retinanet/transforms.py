"""The transforms of the images a RetinaNet trains and runs on: they are resized so that their shorter side is the
model's min_size, 800 pixels for the paper's main models (§5.2 "Speed versus Accuracy", Table 1e, and §5.3; Detectron
caps the longer side at 1333), and "We use horizontal image flipping as the only form of data augmentation unless
otherwise noted" (§4.1 "Optimization"); optional scale jitter draws the shorter side per training image, as for
the paper's final COCO models (§5.3, Table 2), and opt-in augmentations beyond the paper's run around resize and
flip (data/augmentations.py). Images stay uint8, a quarter of the bytes of float32 on their way
to the device; the model normalises them there with the ImageNet mean and std that the pretrained backbone
expects (model.normalize).

Legend for shapes: N boxes, H, W image size.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .boxes import clip_boxes
from .model import IMAGENET_MEAN

MEAN_COLOUR = tuple(round(255 * mean) for mean in IMAGENET_MEAN)  # (124, 116, 104), which normalize takes to ~0

# What a dataset passes through its transforms with an image: "boxes" (N, 4) float32 x1, y1, x2, y2 in its pixels,
# and what follows each box: "labels" (N,) int64 class index, "difficult" (N,) bool (see data/voc.py).
Target = dict[str, torch.Tensor]
# (image (3, H, W) uint8, target) -> (image, target, scale); see DetectionTransform
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target, float]]


class Resize:
    """Resize so the shorter side is min_size unless the longer side would exceed max_size; then the longer side
    is max_size (the model's settings: by default the paper's 800 pixels and Detectron's cap of 1333). min_size =
    (lo, hi) is scale jitter: the shorter side is drawn uniformly from the integers lo..hi for each image (training
    only).

    Called on (image (3, H, W), boxes (N, 4)), returns (image, boxes, scale): boxes are multiplied by scale, the
    factor scale_for draws unless it is given.
    """

    def __init__(self, min_size: int | tuple[int, int], max_size: int):
        low, high = min_size if isinstance(min_size, Sequence) else (min_size, min_size)
        if not 0 < low <= high <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size (min_size a size or a (lo, hi) range), got "
                             f"min_size={min_size}, max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size
        self.size_range = (low, high)

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor for an image of this size (random if min_size is a range)."""
        low, high = self.size_range
        shorter_side = int(torch.randint(low, high + 1, ())) if low < high else low
        scale = shorter_side / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return scale

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        scale = self.scale_for(*image.shape[-2:]) if scale is None else scale
        image = resize_image(image, scale)
        new_height, new_width = image.shape[-2:]
        # Rounding the image size can cut up to half a pixel off the far edges; keep boxes inside the image.
        return image, clip_boxes(boxes * scale, new_height, new_width), scale


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """A (3, H, W) image resized by `scale`, its sides rounded to whole pixels (at least 1): (3, H', W'). Bilinear
    with antialiasing, so that a large downscale averages pixels instead of skipping them."""
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]  # (1, 3, H, W) -> (3, H', W')


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability p (§4.1: "We use horizontal image flipping as the only
    form of data augmentation"). A box x1, x2 in an image of width W becomes W - x2, W - x1."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(())) >= self.p:
            return image, boxes
        width = image.shape[-1]
        flipped = boxes.clone()
        flipped[:, 0] = width - boxes[:, 2]
        flipped[:, 2] = width - boxes[:, 0]
        return image.flip(-1), flipped


class DetectionTransform:
    """The whole pipeline of one item: the geometric augmentations (if any), resize (if any), flip (if any), and the
    photometric augmentation (if any) before the resize if it enlarges the image, after the flip otherwise (see
    data/augmentations.py).

    Called on (image (3, H, W) uint8, target), returns (image, target, scale), where scale is the resize factor
    (1.0 without a resize); the dataset reports it as item["scale"]. A custom `transform` given to a dataset must
    follow the same contract: a uint8 image, and a target whose labels and difficult flags follow their boxes (a box
    it drops goes with its label and flag). Boxes may leave the image: the dataset then clips them to it and drops
    those left without area, with their labels.
    """

    def __init__(self, resize: Resize | None = None, flip: RandomHorizontalFlip | None = None, augmentation=None):
        self.resize = resize
        self.flip = flip
        self.augmentation = augmentation

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target, float]:
        if self.augmentation is not None:
            image, target = self.augmentation.move(image, target)
        boxes = target["boxes"]
        scale = self.resize.scale_for(*image.shape[-2:]) if self.resize is not None else 1.0
        # The photometric augmentation costs per pixel: it runs on the image before or after its resize, the smaller.
        recolour_first = self.augmentation is not None and scale > 1
        if recolour_first:
            image = self.augmentation.recolour(image)
        if self.resize is not None:
            image, boxes, scale = self.resize(image, boxes, scale)
        if self.flip is not None:
            image, boxes = self.flip(image, boxes)
        if self.augmentation is not None and not recolour_first:
            image = self.augmentation.recolour(image)
        return image, {**target, "boxes": boxes}, scale


def build_transform(train: bool, min_size: int, max_size: int, jitter: tuple[int, int] | None = None,
                    augmentation=None) -> DetectionTransform:
    """Training: the augmentation if any (data/augmentations.py: Augmentation) + resize (to min_size, or a
    shorter side drawn from the jitter range) + flip. Evaluation: resize to min_size; jitter and augmentation are
    training settings and do not apply."""
    if train:
        return DetectionTransform(Resize(jitter or min_size, max_size), RandomHorizontalFlip(0.5), augmentation)
    return DetectionTransform(Resize(min_size, max_size))
