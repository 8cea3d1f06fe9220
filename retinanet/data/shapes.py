"""A synthetic "shapes" detection data set to try everything on a CPU: 1-4 shapes of 5 classes on crops of photos,
written as PNG images with CSV and COCO annotations of the same boxes, deterministic in a seed. It is no part of the
paper: it stands in for COCO (§5) so that the detector of §4 can be trained and evaluated in minutes.
"""

import colorsys
import csv
import io
import json
import os
import zlib

import numpy as np
import skimage.data
import skimage.draw
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ..dataloader import write_text_atomically

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "ellipse", "star")
BACKGROUND_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # bundled with scikit-image
SHAPES_VERSION = 1  # bump when the drawing changes, so that stored splits are regenerated
SHAPE_SIZE_RANGE = (0.15, 0.6)  # shape extent as a fraction of the image side
MAX_COVERED = 0.25  # a new shape may hide at most this fraction of an earlier one
MIN_SHAPE_PIXELS = 20  # smaller shapes (possible only in tiny images) are drawn again
BACKGROUND_BRIGHTNESS = 0.55  # darkened photos, so that the bright shapes stand out


def _background_photos() -> list[np.ndarray]:
    """The photos the backgrounds are cropped from, as (H, W, 3) uint8."""
    photos = [getattr(skimage.data, name)() for name in BACKGROUND_PHOTOS]
    return [photo if photo.ndim == 3 else np.repeat(photo[:, :, None], 3, axis=2) for photo in photos]


def _random_background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop of a random photo, resized to (size, size, 3) and darkened so shapes stand out."""
    photo = photos[rng.integers(len(photos))]
    side = int(rng.integers(min(photo.shape[:2]) // 4, min(photo.shape[:2]) + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float32) * BACKGROUND_BRIGHTNESS


def _shape_mask(rng: np.random.Generator, class_name: str, size: int) -> np.ndarray:
    """A (size, size) bool mask of one shape of the class, 15-60 % of the image side across, randomly placed."""
    extent = rng.uniform(*SHAPE_SIZE_RANGE) * size
    radius = extent / 2
    row, col = rng.uniform(0.3 * extent, size - 0.3 * extent, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), dtype=bool)
    if class_name == "circle":
        mask[skimage.draw.disk((row, col), radius, shape=mask.shape)] = True
        return mask
    if class_name == "ellipse":  # clearly elongated, so never mistaken for a circle
        minor = radius * rng.uniform(0.35, 0.6)
        mask[skimage.draw.ellipse(row, col, radius, minor, shape=mask.shape, rotation=angle)] = True
        return mask
    if class_name == "rectangle":  # axis-aligned, sides 1 : 0.5..1
        half_sides = np.array([radius, radius * rng.uniform(0.5, 1.0)])[rng.permutation(2)]
        rows = row + half_sides[0] * np.array([-1, -1, 1, 1])
        cols = col + half_sides[1] * np.array([-1, 1, 1, -1])
    elif class_name == "triangle":  # equilateral, any rotation
        angles = angle + 2 * np.pi * np.arange(3) / 3
        rows, cols = row + radius * np.sin(angles), col + radius * np.cos(angles)
    else:  # five-pointed star: ten vertices alternating between the outer and an inner radius
        angles = angle + np.pi * np.arange(10) / 5
        radii = radius * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        rows, cols = row + radii * np.sin(angles), col + radii * np.cos(angles)
    mask[skimage.draw.polygon(rows, cols, shape=mask.shape)] = True
    return mask


def _place_shape(rng: np.random.Generator, owner: np.ndarray, num_shapes: int) -> tuple[int, np.ndarray] | None:
    """A random shape (class index, mask) that hides at most MAX_COVERED of each of the num_shapes shapes drawn
    so far (owner: index of the shape each pixel shows, -1 for background); None after 10 failed tries."""
    drawn = owner >= 0
    visible = np.bincount(owner[drawn], minlength=num_shapes)  # pixels per drawn shape
    for _ in range(10):
        class_index = int(rng.integers(len(SHAPE_CLASSES)))
        mask = _shape_mask(rng, SHAPE_CLASSES[class_index], owner.shape[0])
        covered = np.bincount(owner[mask & drawn], minlength=num_shapes)
        if mask.sum() >= MIN_SHAPE_PIXELS and np.all(covered <= MAX_COVERED * visible):
            return class_index, mask
    return None


def _render_shapes_image(
    rng: np.random.Generator, photos: list[np.ndarray], size: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int, int]]]:
    """Draw 1-4 shapes on a background. Returns the (size, size, 3) uint8 image and one row per shape:
    x1, y1, x2, y2 (the bounding box of its visible pixels, at pixel edges), class index, visible pixel count."""
    image = _random_background(rng, photos, size)
    owner = np.full((size, size), -1)  # index of the shape each pixel shows, -1 for background
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 5))):
        placed = _place_shape(rng, owner, len(classes))
        if placed is None:
            continue
        class_index, mask = placed
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.85, 1.0)
        image[mask] = 255.0 * np.array(colorsys.hsv_to_rgb(hue, saturation, value))  # a bright colour
        owner[mask] = len(classes)
        classes.append(class_index)
    rows = []
    for shape, class_index in enumerate(classes):
        ys, xs = np.nonzero(owner == shape)
        rows.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, class_index, len(xs)))
    return np.round(image).astype(np.uint8), rows


def _shapes_csv(split: str, image_rows: list[list[tuple]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for i, rows in enumerate(image_rows):
        path = f"images/{split}/{i:05d}.png"
        writer.writerows([(path, x1, y1, x2, y2, SHAPE_CLASSES[c]) for x1, y1, x2, y2, c, _ in rows])
        if not rows:  # every try to place a shape failed (tiny images only): a negative image
            writer.writerow((path, "", "", "", "", ""))
    return text.getvalue()


def _shapes_coco_json(image_rows: list[list[tuple]], size: int) -> str:
    images = [{"id": i + 1, "file_name": f"{i:05d}.png", "width": size, "height": size} for i in range(len(image_rows))]
    annotations = [
        {"image_id": i + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0}
        for i, rows in enumerate(image_rows)
        for x1, y1, x2, y2, c, area in rows
    ]
    for annotation_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = annotation_id
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(SHAPE_CLASSES)]
    return json.dumps({"images": images, "annotations": annotations, "categories": categories})


def make_shapes_dataset(
    root: str, split: str, num_images: int, image_size: int = 160, seed: int = 0
) -> dict[str, str]:
    """Write (once) a synthetic detection split: 1-4 shapes of 5 classes on crops of photos, deterministic in seed.

    Files: `{root}/images/{split}/{i:05d}.png`, `{root}/{split}.csv` and `{root}/classes.csv` (CSVDataset), and
    `{root}/annotations/instances_{split}.json` (CocoDataset), with the same boxes. A stamp file written last,
    `{root}/{split}.done.json`, holds the parameters: a split with the same ones is reused, an interrupted or
    different one is generated again. Returns {"csv", "classes", "coco_root", "set_name"}.
    """
    if num_images < 1 or image_size < 32:
        raise ValueError(f"need num_images >= 1 and image_size >= 32, got {num_images} and {image_size}")
    paths = {
        "csv": os.path.join(root, f"{split}.csv"),
        "classes": os.path.join(root, "classes.csv"),
        "coco_root": root,
        "set_name": split,
    }
    coco_file = os.path.join(root, "annotations", f"instances_{split}.json")
    stamp_path = os.path.join(root, f"{split}.done.json")
    parameters = {"num_images": num_images, "image_size": image_size, "seed": seed, "version": SHAPES_VERSION}
    if os.path.isfile(stamp_path):
        with open(stamp_path, encoding="utf-8") as file:
            stamped = json.load(file)
        if stamped == parameters and all(os.path.isfile(path) for path in (paths["csv"], paths["classes"], coco_file)):
            return paths
        os.remove(stamp_path)
    image_dir = os.path.join(root, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    photos = _background_photos()
    image_rows = []
    for i in tqdm(range(num_images), desc=f"generating shapes {split} images in {root}", unit="image", leave=False):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i])  # image i depends on nothing else
        image, rows = _render_shapes_image(rng, photos, image_size)
        Image.fromarray(image).save(os.path.join(image_dir, f"{i:05d}.png"), compress_level=1)
        image_rows.append(rows)
    write_text_atomically(paths["classes"], "".join(f"{name},{c}\n" for c, name in enumerate(SHAPE_CLASSES)))
    write_text_atomically(paths["csv"], _shapes_csv(split, image_rows))
    write_text_atomically(coco_file, _shapes_coco_json(image_rows, image_size))
    write_text_atomically(stamp_path, json.dumps(parameters))
    return paths


def make_shapes_demo(root: str, num_train: int, num_val: int, seed: int = 0) -> tuple[str, str, str]:
    """The demo's training and validation splits (seeds `seed` and `seed` + 1), written once (in a distributed run
    by the first process, while the others wait): the paths of the training CSV, the class list and the validation
    CSV."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        make_shapes_dataset(root, "train", num_train, seed=seed)
        make_shapes_dataset(root, "val", num_val, seed=seed + 1)
    if distributed:
        dist.barrier()
    return shapes_demo_files(root)


def shapes_demo_files(root: str) -> tuple[str, str, str]:
    """Where make_shapes_demo writes the training CSV, the class list and the validation CSV."""
    return os.path.join(root, "train.csv"), os.path.join(root, "classes.csv"), os.path.join(root, "val.csv")
