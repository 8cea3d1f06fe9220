import pytest
import torch
from conftest import CLASSES, save_image, write

from retinanet.dataloader import MEAN_COLOUR, CSVDataset, RandomHorizontalFlip, Resize, build_transform
from retinanet.model import normalize
from retinanet.settings import IMAGENET_MEAN, IMAGENET_STD


def test_resize_scales_shorter_side_and_boxes_by_the_reported_factor():
    image = torch.rand(3, 30, 40)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    resized, resized_boxes, scale = Resize(60, 1000)(image, boxes)
    assert scale == 2.0  # shorter side 30 -> 60
    assert resized.shape == (3, 60, 80)
    torch.testing.assert_close(resized_boxes, boxes * 2)


def test_resize_respects_max_size():
    image = torch.rand(3, 10, 40)
    # shorter side 10 -> 60 would make the longer side 240 > 100, so the longer side becomes 100: scale 2.5
    resized, boxes, scale = Resize(60, 100)(image, torch.tensor([[0.0, 0.0, 40.0, 10.0]]))
    assert scale == 2.5
    assert resized.shape == (3, 25, 100)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 100.0, 25.0]]))


def test_resize_keeps_a_constant_image_constant_and_jitter_draws_every_size():
    image = torch.full((3, 37, 53), 0.3)
    resized, _, _ = Resize(17, 1000)(image, torch.zeros(0, 4))  # antialiased downsampling
    torch.testing.assert_close(resized, torch.full((3, 17, 24), 0.3))  # 53 * 17 / 37 = 24.4
    torch.manual_seed(0)
    jitter = Resize((50, 53), 1000)
    shorter_sides = {jitter(torch.rand(3, 30, 40), torch.zeros(0, 4))[0].shape[1] for _ in range(60)}
    assert shorter_sides == {50, 51, 52, 53}


@pytest.mark.parametrize("min_size, max_size", [(0, 10), (20, 10), ((60, 50), 100), ((40, 120), 100)])
def test_resize_rejects_bad_sizes(min_size, max_size):
    with pytest.raises(ValueError, match="min_size"):
        Resize(min_size, max_size)


def test_flip_by_hand_and_twice_is_identity():
    image = torch.rand(3, 30, 40)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 20.0], [0.0, 0.0, 40.0, 30.0]])
    flip = RandomHorizontalFlip(p=1.0)
    flipped, flipped_boxes = flip(image, boxes)
    # x1' = W - x2 = 40 - 10, x2' = W - x1 = 40 - 1
    torch.testing.assert_close(flipped_boxes, torch.tensor([[30.0, 2.0, 39.0, 20.0], [0.0, 0.0, 40.0, 30.0]]))
    torch.testing.assert_close(flipped[:, :, 0], image[:, :, 39])
    again, again_boxes = flip(flipped, flipped_boxes)
    torch.testing.assert_close(again, image)
    torch.testing.assert_close(again_boxes, boxes)
    unchanged, unchanged_boxes = RandomHorizontalFlip(p=0.0)(image, boxes)
    assert unchanged is image and unchanged_boxes is boxes


def test_normalize_uses_imagenet_statistics_and_takes_the_mean_colour_to_about_zero():
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(mean.expand(1, 3, 2, 2), mean, std), torch.zeros(1, 3, 2, 2))
    white = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), mean, std)  # uint8 0..255 -> 0..1
    torch.testing.assert_close(white.flatten(), (1 - mean.flatten()) / std.flatten())
    padding = normalize(torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(1, 3, 1, 1), mean, std)
    assert padding.abs().max() < 0.01  # the colour collate pads with


def test_build_transform_scale_reaches_the_item(tmp_path):
    save_image(tmp_path / "a.png", width=40, height=30)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,1,2,10,20,dog\n")
    dataset = CSVDataset(str(annotations), str(classes), transform=build_transform(False, 60, 1000))
    item = dataset[0]
    assert item["scale"] == 2.0 and item["image"].shape == (3, 60, 80) and item["original_size"] == (30, 40)
    torch.testing.assert_close(item["annotations"], torch.tensor([[2.0, 4.0, 20.0, 40.0, 1.0]]))
    train = build_transform(True, 60, 1000, jitter=(45, 75))
    assert train.resize.size_range == (45, 75) and train.flip.p == 0.5
    assert build_transform(False, 60, 1000, jitter=(45, 75)).flip is None
