"""Data augmentation beyond the paper's, opt-in (train.py --augment NAME ...). "We use horizontal image flipping as the
only form of data augmentation unless otherwise noted" (§4.1 "Optimization"): right for COCO's 118k images, too
little for a user's few hundred, and wrong for aerial or microscopy images, which have no "up".

Built on torchvision.transforms.v2, which moves boxes (tv_tensors.BoundingBoxes) with their pixels; the labels and
difficult flags of the boxes pass through untouched, in box order. The geometric augmentations run before the
resize of dataloader.py (so that the image they make is resized to the model's size), the photometric one on the
image before or after the resize, whichever is smaller (its cost is per pixel). A box that leaves the image is then
clipped to it, and dropped with its label when no area is left, as for boxes of an annotation file
(dataloader.clip_to_image): the dataset does that after every transform. Random numbers come from torch's global generator, which the
datasets seed per item, so that a resumed run sees the same augmentation.
"""

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..dataloader import MEAN_COLOUR, DetectionTransform

# SSD's photometric distortions (torchvision's RandomPhotometricDistort), each applied to half of the images, without
# its random swap of colour channels: a red object stays red.
PHOTOMETRIC_RANGES = {"brightness": (0.875, 1.125), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5),
                      "hue": (-0.05, 0.05)}
PHOTOMETRIC_PROBABILITY = 0.5
# Zoom out: the image placed on a larger canvas, each side 1 to 2 times the image's, for half of the images. SSD's
# canvas reaches 4 times the side at 300 pixels; at 800 that would shrink a 64-pixel object to 16, below the
# smallest anchor (32).
ZOOM_OUT_SIDE_RANGE = (1.0, 2.0)
ZOOM_OUT_PROBABILITY = 0.5
VERTICAL_FLIP_PROBABILITY = 0.5
QUARTER_TURNS = (0, 90, 180, 270)  # rot90: one of these angles, each as likely


class RandomIoUCrop(v2.RandomIoUCrop):
    """SSD's random crop, as torchvision's RandomIoUCrop draws it: each side 0.3 to 1 of the image's, aspect ratio
    1/2 to 2, overlapping some box with an IoU of at least one of 0, 0.1, 0.3, 0.5, 0.7, 0.9 drawn per image, or no
    crop (1 in 7 images, and every image without boxes). Boxes follow the rule of annotation files: clipped to the
    crop, dropped (by the dataset) when no area is left; SSD also drops those whose centre falls outside."""

    def make_params(self, flat_inputs: list) -> dict:
        """No crop for an image without boxes, at once: torchvision's search would end there after hundreds of
        trials, none of which can overlap a box."""
        boxes = next(inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.BoundingBoxes))
        return super().make_params(flat_inputs) if len(boxes) else {}

    def transform(self, inpt, params: dict):
        """Crop an image or boxes (clipped to the crop) as the drawn params say; nothing if they say no crop."""
        if not params:
            return inpt
        return F.crop(inpt, top=params["top"], left=params["left"], height=params["height"], width=params["width"])


def photometric() -> v2.Transform:
    """Brightness, contrast, saturation and hue, each changed with probability PHOTOMETRIC_PROBABILITY."""
    return v2.Compose([v2.RandomApply([v2.ColorJitter(**{name: value})], p=PHOTOMETRIC_PROBABILITY)
                       for name, value in PHOTOMETRIC_RANGES.items()])


AUGMENTATIONS = ("photometric", "zoom_out", "crop", "rot90", "vflip")  # the names --augment takes


def geometric_augmentations(names: Sequence[str], fill: tuple[int, int, int]) -> list[v2.Transform]:
    """The geometric augmentations named, in the order they run whatever the order asked: zoom out then crop, as
    SSD, then quarter turns and vertical flips. `fill` is the colour of zoom_out's canvas."""
    made = {
        "zoom_out": lambda: v2.RandomZoomOut(fill=fill, side_range=ZOOM_OUT_SIDE_RANGE, p=ZOOM_OUT_PROBABILITY),
        "crop": RandomIoUCrop,
        "rot90": lambda: v2.RandomChoice([v2.RandomRotation((angle, angle), expand=True) for angle in QUARTER_TURNS]),
        "vflip": lambda: v2.RandomVerticalFlip(VERTICAL_FLIP_PROBABILITY),
    }
    return [make() for name, make in made.items() if name in names]


class Augmentation:
    """The augmentations named, from AUGMENTATIONS: `move` runs the geometric ones on an image and its target,
    `recolour` the photometric one on an image (each does nothing if none of its kind is named), `around` puts both
    around the resize and flip of a transform. `fill` is the colour of zoom_out's canvas: the mean colour, which the
    model normalises to 0, as padding."""

    def __init__(self, names: Sequence[str], fill: tuple[int, int, int] = MEAN_COLOUR):
        unknown = sorted(set(names) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; expected some of {list(AUGMENTATIONS)}")
        geometric = geometric_augmentations(names, fill)
        self.geometric = v2.Compose(geometric) if geometric else None
        self.photometric = photometric() if "photometric" in names else None

    def move(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """(3, H, W) uint8 image and its target (transforms.Target) -> the same, moved: (3, H', W') and the
        target's boxes with it, the rest of the target as it was."""
        if self.geometric is None:
            return image, target
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, moved = self.geometric(tv_tensors.Image(image), {**target, "boxes": boxes})
        return image.as_subclass(torch.Tensor), {**moved, "boxes": moved["boxes"].as_subclass(torch.Tensor)}

    def recolour(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 image -> the same, its colours changed."""
        return image if self.photometric is None else self.photometric(image)

    def around(self, transform: DetectionTransform) -> "AugmentedTransform":
        """`transform` (resize and flip) with these augmentations around it."""
        return AugmentedTransform(transform, self)


class AugmentedTransform:
    """A DetectionTransform with augmentations around it: the geometric ones before the resize, so that the image
    they make is resized to the model's size, the photometric one on the smaller of the image before and after the
    resize (its cost is per pixel). The same contract as DetectionTransform's."""

    def __init__(self, transform: DetectionTransform, augmentation: Augmentation):
        self.transform = transform
        self.augmentation = augmentation

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict, float]:
        resize, flip = self.transform.resize, self.transform.flip
        image, target = self.augmentation.move(image, target)
        boxes = target["boxes"]
        scale = resize.scale_for(*image.shape[-2:]) if resize is not None else 1.0
        if scale > 1:
            image = self.augmentation.recolour(image)
        if resize is not None:
            image, boxes, scale = resize(image, boxes, scale)
        if flip is not None:
            image, boxes = flip(image, boxes)
        if scale <= 1:
            image = self.augmentation.recolour(image)
        return image, {**target, "boxes": boxes}, scale
