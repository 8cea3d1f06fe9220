"""Tests of the opt-in augmentations (retinanet/data/augmentations.py) through the datasets' items: every box stays on its
object and takes its label and difficult flag along, boxes leaving the image are clipped or dropped as boxes of an
annotation file are, images without boxes stay valid, and the augmentation of an item depends on its seed only."""

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data.augmentations import AUGMENTATIONS, Augmentation
from retinanet.dataloader import (MEAN_COLOUR, DetectionDataset, DetectionTransform, Resize, build_transform, collate,
                                  inside_image, item_seed)

BACKGROUND = (128, 128, 128)  # grey stays grey under every photometric change
# One rectangle per colour channel: label k is the rectangle whose channel k dominates. x1, y1, x2, y2 in pixels of
# a 80 x 60 image; the green one is difficult.
RECTANGLES = [(8, 6, 30, 26), (40, 10, 70, 40), (15, 35, 35, 55)]
DIFFICULT = [False, True, False]
DOMINANCE = 40  # a pixel belongs to rectangle k if channel k exceeds the two others by this much
SEEDS = range(12)


def rectangles_image(path) -> str:
    """A grey 80 x 60 PNG with a red, a green and a blue filled rectangle (RECTANGLES)."""
    pixels = np.full((60, 80, 3), BACKGROUND, dtype=np.uint8)
    for channel, (x1, y1, x2, y2) in enumerate(RECTANGLES):
        pixels[y1:y2, x1:x2] = 0
        pixels[y1:y2, x1:x2, channel] = 255
    Image.fromarray(pixels).save(path)
    return str(path)


def rectangles_dataset(tmp_path, transform) -> DetectionDataset:
    annotations = np.array([[*box, label] for label, box in enumerate(RECTANGLES)], dtype=np.float32)
    return DetectionDataset([rectangles_image(tmp_path / "rectangles.png")], [annotations], ["red", "green", "blue"],
                            transform, difficult=[np.array(DIFFICULT)])


def pixels_of(image: torch.Tensor, channel: int) -> np.ndarray:
    """(P, 2) x, y of the pixels where `channel` dominates the two others."""
    image = image.int()
    others = torch.cat([image[:channel], image[channel + 1:]]).max(dim=0).values  # (H, W)
    ys, xs = torch.nonzero(image[channel] - others > DOMINANCE, as_tuple=True)
    return torch.stack([xs, ys], dim=1).numpy()


def assert_boxes_on_their_rectangles(item: dict) -> None:
    """Each box bounds the pixels of its rectangle (within a pixel, for the blending of a resize) and they fill it;
    a rectangle whose box was dropped has no pixel left in the image."""
    labels = item["annotations"][:, 4].long().tolist()
    assert item["difficult"].tolist() == [DIFFICULT[label] for label in labels]
    for channel in range(3):
        pixels = pixels_of(item["image"], channel)
        if channel not in labels:
            assert len(pixels) == 0, f"rectangle {channel} is in the image but lost its box"
            continue
        x1, y1, x2, y2 = item["annotations"][labels.index(channel), :4].tolist()
        centres = pixels + 0.5  # (P, 2) centres of the pixels
        assert (centres >= [x1 - 1, y1 - 1]).all() and (centres <= [x2 + 1, y2 + 1]).all()
        if x2 - x1 >= 2 and y2 - y1 >= 2:  # a box of some size: its rectangle's pixels reach its edges
            np.testing.assert_allclose([*pixels.min(axis=0), *(pixels.max(axis=0) + 1)], [x1, y1, x2, y2], atol=1.5)


@pytest.mark.parametrize("names", [[name] for name in AUGMENTATIONS] + [list(AUGMENTATIONS)])
def test_each_augmentation_keeps_every_box_on_its_object_with_its_label(tmp_path, names):
    dataset = rectangles_dataset(tmp_path, build_transform(True, 60, 1000, augmentation=Augmentation(names)))
    for seed in SEEDS:
        assert_boxes_on_their_rectangles(dataset[(0, seed)])
    # The same augmentation without resize jitter and flip: it changes some of the items.
    alone = rectangles_dataset(tmp_path, Augmentation(names, MEAN_COLOUR).around(DetectionTransform(Resize(60, 1000))))
    plain = alone[0]
    assert any(not torch.equal(alone[(0, seed)]["image"], plain["image"]) for seed in SEEDS)


def test_crop_and_zoom_out_change_the_boxes_and_rot90_the_orientation(tmp_path):
    items = {name: [rectangles_dataset(tmp_path, build_transform(True, 60, 1000, augmentation=Augmentation([name])))[(0, seed)]
                    for seed in SEEDS] for name in ("crop", "zoom_out", "rot90")}
    assert any(len(item["annotations"]) < 3 for item in items["crop"])  # some crop leaves a rectangle out
    # zoomed out, then resized back to a shorter side of 60: the rectangles shrink
    assert any(item["annotations"][0, 2] - item["annotations"][0, 0] < 20 for item in items["zoom_out"])
    assert {tuple(item["image"].shape[1:]) for item in items["rot90"]} == {(60, 80), (80, 60)}


def test_an_item_depends_on_its_seed_only(tmp_path):
    dataset = rectangles_dataset(tmp_path, build_transform(True, 60, 1000, augmentation=Augmentation(AUGMENTATIONS)))
    seed = item_seed(0, epoch=3, index=0)
    first, again = dataset[(0, seed)], dataset[(0, seed)]
    torch.manual_seed(123)  # the global generator does not matter
    third = dataset[(0, seed)]
    for item in (again, third):
        assert torch.equal(item["image"], first["image"]) and torch.equal(item["annotations"], first["annotations"])
    assert any(not torch.equal(dataset[(0, other)]["image"], first["image"]) for other in SEEDS)


def test_an_augmented_batch_of_images_without_boxes_is_valid(tmp_path):
    paths = []
    for i, size in enumerate([(40, 30), (50, 30), (30, 44)]):
        Image.new("RGB", size, (10 * i, 200, 90)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    no_boxes = [np.zeros((0, 5), np.float32)] * len(paths)
    dataset = DetectionDataset(paths, no_boxes, ["cat"],
                               build_transform(True, 32, 64, augmentation=Augmentation(AUGMENTATIONS)))
    for seed in SEEDS:
        batch = collate([dataset[(index, seed)] for index in range(3)])
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[:2] == (3, 3)
        assert batch["annotations"].shape == (3, 0, 5) and batch["difficult"].shape == (3, 0)
        assert all(min(size) == 32 for size in batch["image_sizes"].tolist())  # resized after zoom, crop and turns


def test_boxes_leaving_the_image_are_clipped_or_dropped_with_their_labels_and_flags():
    image = torch.zeros(3, 30, 40, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[-5.0, 2, 10, 20], [50, 5, 60, 9], [30, 25, 45, 35]]),
              "labels": torch.tensor([0, 1, 2]), "difficult": torch.tensor([False, True, True])}
    annotations, difficult = inside_image(image, target, "a.png")
    # the first is clipped at x = 0, the second lies outside the 40 x 30 image (dropped), the third is clipped
    torch.testing.assert_close(annotations, torch.tensor([[0.0, 2, 10, 20, 0], [30, 25, 40, 30, 2]]))
    assert difficult.tolist() == [False, True]


def test_a_transform_that_loses_labels_is_refused_naming_the_image(tmp_path):
    def drop_last_box(image, target):
        return image, {**target, "boxes": target["boxes"][:-1]}, 1.0

    dataset = rectangles_dataset(tmp_path, drop_last_box)
    with pytest.raises(ValueError, match=r"rectangles.png: transform returned .* one label and one flag per box"):
        dataset[0]


def test_unknown_augmentations_are_refused():
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['blur'\]"):
        Augmentation(["crop", "blur"])
