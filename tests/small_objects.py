"""Scenes of small objects for the tests of tiled prediction: bright discs and squares at known places on a dark,
noisy background, as one large image or as a training set seen at a quarter of that scale; and a detector that is
not learned but finds such objects from the pixels alone, for exact tests of the tiling."""

import csv
import os

import numpy as np
import skimage.measure
import torch
from PIL import Image, ImageDraw
from torch import nn

from retinanet.dataloader import resize_image
from retinanet.settings import ModelSettings

CLASS_NAMES = ("disc", "square")
OBJECT_SIDES = (80, 120)  # pixels, in the large image; a quarter of that in the training set
SCENE_SIDE, VIEW_SIDE = 256, 64  # a training scene, and the same seen at a quarter of its size
GAP = 16  # pixels between objects at least
BRIGHT = 150  # objects are brighter than this in some channel, the background is darker in all
BLOB_SCORE = 0.9


def scatter_objects(rng: np.random.Generator, height: int, width: int, count: int,
                    taken: list[tuple] = ()) -> list[tuple[int, int, int, int, int]]:
    """Up to `count` square boxes (x1, y1, x2, y2, class) of OBJECT_SIDES, inside the image, GAP apart from each
    other and from the boxes in `taken`."""
    objects = list(taken)
    for _ in range(100 * count):
        if len(objects) == len(taken) + count:
            break
        side = int(rng.integers(OBJECT_SIDES[0], OBJECT_SIDES[1] + 1))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        if all(x + side + GAP <= x1 or x2 + GAP <= x or y + side + GAP <= y1 or y2 + GAP <= y
               for x1, y1, x2, y2, _ in objects):
            objects.append((x, y, x + side, y + side, int(rng.integers(len(CLASS_NAMES)))))
    return objects[len(taken):]


def draw_scene(rng: np.random.Generator, height: int, width: int, objects: list[tuple]) -> np.ndarray:
    """(height, width, 3) uint8: a smooth dark background with noise, and each object filled in a bright colour."""
    coarse = rng.uniform(20, 90, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width + 64, height + 64), Image.Resampling.BILINEAR)
    noisy = np.asarray(smooth, dtype=np.float32)[:height, :width] + rng.normal(0, 8, size=(height, width, 3))
    picture = Image.fromarray(np.clip(noisy, 0, 120).astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    for x1, y1, x2, y2, label in objects:
        color = tuple(int(value) for value in rng.integers(BRIGHT + 30, 256, size=3))
        (pen.ellipse if CLASS_NAMES[label] == "disc" else pen.rectangle)([x1, y1, x2 - 1, y2 - 1], fill=color)
    return np.array(picture)


def save_scene(path: str, height: int, width: int, objects: list[tuple], seed: int) -> str:
    """Draw the objects on a background of `seed` and save the scene as a PNG at `path`."""
    Image.fromarray(draw_scene(np.random.default_rng(seed), height, width, objects)).save(path, compress_level=1)
    return path


def write_training_set(root: str, count: int, seed: int = 0,
                       class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, str]:
    """`count` scenes of 256 x 256 pixels with 1-4 objects, saved at a quarter of that (64 x 64, objects of 20-30
    pixels, as the large image's 256-pixel tiles look to a model of min_size 64), with their CSV annotations and
    class list in `root`; with one class name, discs and squares are both of that class. Returns the paths of the
    annotations and the class list."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        objects = scatter_objects(rng, SCENE_SIDE, SCENE_SIDE, int(rng.integers(1, 5)))
        scene = torch.from_numpy(draw_scene(rng, SCENE_SIDE, SCENE_SIDE, objects)).permute(2, 0, 1)  # (3, H, W)
        small = resize_image(scene, VIEW_SIDE / SCENE_SIDE).permute(1, 2, 0).numpy()  # (3, h, w) -> (h, w, 3)
        name = f"images/{index:04d}.png"
        Image.fromarray(small).save(os.path.join(root, name))
        rows += [(name, *(side * VIEW_SIDE / SCENE_SIDE for side in box[:4]), class_names[box[4] % len(class_names)])
                 for box in objects]
    with open(os.path.join(root, "train.csv"), "w", newline="", encoding="utf-8") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)
    with open(os.path.join(root, "classes.csv"), "w", encoding="utf-8") as file:
        file.writelines(f"{name},{label}\n" for label, name in enumerate(class_names))
    return os.path.join(root, "train.csv"), os.path.join(root, "classes.csv")


class BrightBlobDetector(nn.Module):
    """A detector that is not learned: in each input image it finds the connected regions of bright pixels and
    reports those of 12 to 64 input pixels across, a square if they fill their box, else a disc, all with the same
    score. Like a RetinaNet it knows only what its input shows: an object shrunk below 12 pixels is lost, and one
    cut by a tile's side is reported cut."""

    def __init__(self, min_size: int = VIEW_SIDE, max_size: int = VIEW_SIDE):
        super().__init__()
        self.settings = ModelSettings(num_classes=len(CLASS_NAMES), min_size=min_size, max_size=max_size)
        self.device_marker = nn.Parameter(torch.zeros(1))  # predict_dataset reads the device from the parameters

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [self.detect_one(image[:, :height, :width])
                for image, (height, width) in zip(images, image_sizes.tolist())]

    @staticmethod
    def detect_one(image: torch.Tensor) -> dict[str, torch.Tensor]:
        found = []
        for region in skimage.measure.regionprops(skimage.measure.label((image.amax(dim=0) > BRIGHT).numpy())):
            y1, x1, y2, x2 = region.bbox
            if 12 <= min(y2 - y1, x2 - x1) and max(y2 - y1, x2 - x1) <= 64:
                found.append(([x1, y1, x2, y2], int(region.extent > 0.9), BLOB_SCORE))  # extent: area / box area
        boxes, labels, scores = zip(*found) if found else ([], [], [])
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)}
