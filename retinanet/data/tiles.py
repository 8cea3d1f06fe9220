"""Tiles of large images: where they lie, and annotated images cut into training tiles with their boxes.

Not in the paper, whose detector sees each image whole, resized to one scale (§5.2 "Speed versus Accuracy"). An
aerial photograph or a slide of 10,000 pixels resized that way shrinks its objects below the smallest anchors (32
pixels on P3, §4 "Anchors"); cut into tiles at its own resolution, as DeepForest's split_raster does, every part of
it is seen at the scale of its objects. extras/tiling.py predicts tile by tile with the same windows.

- A tile is a window of tile_size x tile_size pixels; neighbouring tiles overlap by at least `overlap` of a tile,
  the first and last lie flush with the image's edges (tile_windows). An image lower or narrower than a tile gives
  tiles as low or narrow as it is.
- A box wholly inside a tile is kept as it is. A box cut by the tile's edge is kept, clipped to the tile, when at
  least `min_visible` of its area lies inside the tile, and left out otherwise (tile_boxes). The part of an object
  left out stays in the tile's pixels, unlabelled: a lower min_visible labels more such parts, a higher one keeps
  only boxes that show most of their object. With an overlap at least as large as the objects, each object lies
  whole in some tile.

Legend for shapes: N boxes of an image.
"""

import csv
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_area

from ..dataloader import clip_to_image, read_rgb_image, write_atomically, write_text_atomically

DEFAULT_OVERLAP = 0.25  # every object up to a quarter of a tile across then lies whole in some tile
DEFAULT_MIN_VISIBLE = 0.5  # a cut box is kept when at least half of its area is inside the tile


# ------------------------------------------------------------------------------------------------ windows


def tile_starts(length: int, tile_size: int, overlap: float) -> list[int]:
    """Where the tiles along a side of `length` pixels start: as few tiles as overlap by at least `overlap` of a
    tile, evenly spread, the first at 0 and the last ending at `length`; [0] if one tile covers the side."""
    if length <= tile_size:
        return [0]
    count = math.ceil((length - tile_size) / (tile_size * (1 - overlap))) + 1
    return [round(i * (length - tile_size) / (count - 1)) for i in range(count)]


def check_tiling(tile_size: int, overlap: float) -> None:
    """Raise ValueError unless tile_size is a positive number of pixels and overlap a fraction of a tile below 1."""
    if tile_size < 1 or not 0 <= overlap < 1:
        raise ValueError(f"need a tile size of at least 1 pixel and an overlap in [0, 1) (a fraction of a tile), "
                         f"got tile size {tile_size} and overlap {overlap}")


def tile_windows(height: int, width: int, tile_size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """The tiles of a height x width image as (x1, y1, x2, y2) windows in its pixels, row by row. Each is
    tile_size x tile_size, or as high (wide) as the image where the image is lower (narrower) than a tile."""
    check_tiling(tile_size, overlap)
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [(x, y, x + tile_width, y + tile_height)
            for y in tile_starts(height, tile_size, overlap) for x in tile_starts(width, tile_size, overlap)]


# -------------------------------------------------------------------------------------------------- boxes


class TileBoxes(NamedTuple):
    """The boxes of one tile, and what happened to the image's boxes that reach into it."""

    boxes: np.ndarray  # (M, 5) x1, y1, x2, y2, class index in the tile's pixels
    whole: int  # boxes wholly inside the tile
    clipped: int  # boxes cut by its edge, kept clipped
    left_out: int  # boxes cut by its edge with less than min_visible of their area inside


def tile_boxes(boxes: np.ndarray, window: tuple[int, int, int, int], min_visible: float) -> TileBoxes:
    """The (N, 5) boxes x1, y1, x2, y2, class of an image as seen by the tile `window` (x1, y1, x2, y2 in the
    image's pixels): those with at least `min_visible` of their area inside it, clipped to it and moved into its
    pixels (see the module docstring)."""
    x1, y1, x2, y2 = window
    moved = torch.from_numpy(boxes).clone()
    moved[:, :4] -= torch.tensor([x1, y1, x1, y1], dtype=moved.dtype)  # (N, 4) - (4,): into the tile's pixels
    clipped, reaching = clip_to_image(moved, y2 - y1, x2 - x1)  # (N, 5), (N,): boxes with some area in the tile
    areas, inside = box_area(moved[:, :4]), box_area(clipped[:, :4])  # (N,) each
    whole = reaching & (inside == areas)
    kept = reaching & (inside >= min_visible * areas)
    return TileBoxes(clipped[kept].numpy(), int(whole.sum()), int((kept & ~whole).sum()),
                     int((reaching & ~kept).sum()))


def check_min_visible(min_visible: float) -> None:
    """Raise ValueError unless min_visible is a fraction of a box's area in (0, 1]."""
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible is the fraction of a box's area that must lie inside a tile, in (0, 1]; got "
                         f"{min_visible}")


# -------------------------------------------------------------------------------------------------- files


class TilingReport(NamedTuple):
    """What cutting a set of images into tiles wrote and decided, summed over the images."""

    images: int
    tiles: int  # tiles written
    empty_tiles: int  # tiles without a box: among those written, or with skip_empty, those left out
    whole: int
    clipped: int
    left_out: int  # (box, tile) pairs, as TileBoxes counts them


def tile_name(image_path: str, window: tuple[int, int, int, int]) -> str:
    """The file name of a tile: its image's name and where the tile starts, e.g. site_12_x1600_y800.png."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return f"{stem}_x{window[0]}_y{window[1]}.png"


def cut_image(image_path: str, boxes: np.ndarray, class_names: Sequence[str], image_dir: str, tile_size: int,
              overlap: float, min_visible: float, skip_empty: bool = False,
              allow_large: bool = False) -> tuple[list[list], TilingReport]:
    """Cut one annotated image into tiles, write them as PNG files into image_dir, and return their CSV rows
    (path relative to image_dir's parent, x1, y1, x2, y2, class_name; `path,,,,,` for a tile without a box)
    with what was done. With skip_empty, tiles without a box are not written."""
    image = read_rgb_image(image_path, allow_large=allow_large)  # (3, H, W)
    rows, seen = [], []
    for window in tile_windows(image.shape[1], image.shape[2], tile_size, overlap):
        kept = tile_boxes(boxes, window, min_visible)
        seen.append(kept)
        if skip_empty and len(kept.boxes) == 0:
            continue
        name = tile_name(image_path, window)
        x1, y1, x2, y2 = window
        pixels = image[:, y1:y2, x1:x2].permute(1, 2, 0).numpy()  # (3, h, w) -> (h, w, 3)
        Image.fromarray(pixels).save(os.path.join(image_dir, name), compress_level=1)
        path = f"{os.path.basename(image_dir)}/{name}"
        rows += ([[path, *(f"{value:g}" for value in box[:4]), class_names[int(box[4])]] for box in kept.boxes]
                 or [[path, "", "", "", "", ""]])
    empty = sum(len(tile.boxes) == 0 for tile in seen)
    report = TilingReport(1, len(seen) - (empty if skip_empty else 0), empty, sum(tile.whole for tile in seen),
                          sum(tile.clipped for tile in seen), sum(tile.left_out for tile in seen))
    return rows, report


def cut_into_tiles(images: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], output_dir: str,
                   tile_size: int, overlap: float = DEFAULT_OVERLAP, min_visible: float = DEFAULT_MIN_VISIBLE,
                   skip_empty: bool = False, allow_large: bool = False) -> TilingReport:
    """Cut annotated images, (path, (N, 5) boxes x1, y1, x2, y2, class index) each, into training tiles: PNG files
    in {output_dir}/images/, their boxes in {output_dir}/train.csv and the classes in {output_dir}/classes.csv,
    the CSV format train.py and csv_eval.py read. Tile names must not repeat: two images of the same name in
    different folders raise ValueError. Returns the counts, summed over the images."""
    check_tiling(tile_size, overlap)
    check_min_visible(min_visible)
    stems = Counter(os.path.splitext(os.path.basename(path))[0] for path, _ in images)
    repeated = sorted(stem for stem, count in stems.items() if count > 1)
    if repeated:
        raise ValueError(f"images of the same name (in different folders, or with other extensions) would give tiles "
                         f"of the same name: {repeated[:5]}; rename them")
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rows, total = [], TilingReport(0, 0, 0, 0, 0, 0)
    for path, boxes in images:
        image_rows, report = cut_image(path, boxes, class_names, image_dir, tile_size, overlap, min_visible,
                                       skip_empty, allow_large)
        rows += image_rows
        total = TilingReport(*(a + b for a, b in zip(total, report)))
    write_text_atomically(os.path.join(output_dir, "classes.csv"),
                          "".join(f"{name},{index}\n" for index, name in enumerate(class_names)))
    write_atomically(os.path.join(output_dir, "train.csv"), lambda file: csv.writer(file, lineterminator="\n").writerows(rows))
    return total
