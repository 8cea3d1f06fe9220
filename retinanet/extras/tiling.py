"""Tiled inference: detection on images much larger than those a model was trained on, cut into overlapping tiles.

Not in the paper, whose detector sees each image whole, resized to one scale (§5.2 "Speed versus Accuracy": a
shorter side of 400 to 800 pixels). An aerial photograph or a microscope slide of 10,000 pixels resized that way
shrinks its objects below the smallest anchors (32 pixels on P3, §4 "Anchors"). Cut into tiles, as DeepForest's
predict_tile and SAHI do, every part of it is seen at the scale the model was trained at:

- a tile is a window of tile_size x tile_size pixels of the image at its own resolution; neighbouring tiles overlap
  by at least `overlap` of a tile, the first and last lie flush with the image's edges (data/tiles.py, which also
  cuts annotated images into training tiles of the same windows);
- every tile is resized by the factor the model's resize rule gives a tile_size x tile_size image, min_size /
  tile_size: a tile of the model's min_size is seen at scale 1, one of twice that at scale 1/2;
- the tiles go through the model in batches (inference.predict), and their boxes are shifted back into the image;
- a box that reaches a side of its tile lying inside the image is cut there; it is dropped where another tile holds
  it whole, away from that tile's own inner sides: that tile sees what this one sees of the object and more;
- the boxes left are merged with class-wise NMS at the model's threshold (§4.1 "Inference": 0.5). Each tile keeps
  the model's max_detections; the merged image is not capped, as it may hold many tiles' worth of objects.

An image no larger than a tile is not cut: it is one window, resized by the model's rule as without tiling.

Legend for shapes: D detections of an image, C of them cut by a tile's side, N tiles of an image.
"""

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import batched_nms
from tqdm import tqdm

from ..data.tiles import DEFAULT_OVERLAP, check_tiling, tile_windows
from ..dataloader import Resize, inference_loader, read_image_size, read_rgb_image, resize_image
from ..inference import predict

SIDE_MARGIN = 2  # pixels of the model's input: a box this close to a side of its tile touches it


class Window(NamedTuple):
    """A part of an image that the model sees: the whole image or one of its tiles."""

    image: int  # the image's position in the list of images
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the image's pixels
    scale: float  # the resize factor of the window


def image_size(image: str | torch.Tensor, allow_large: bool = False) -> tuple[int, int]:
    """(height, width) of a (3, H, W) uint8 RGB tensor, or of an image file, from its header (read_image_size)."""
    if not isinstance(image, torch.Tensor):
        return read_image_size(image, allow_large)
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected an image file or a (3, H, W) uint8 RGB tensor (as read_rgb_image returns), got a "
                         f"{image.dtype} tensor of shape {tuple(image.shape)}")
    return image.shape[1], image.shape[2]


class ImageWindows(Dataset):
    """The windows of some images, one item per window, in the order of the images: each image whole, or, with a
    tile_size, cut into tiles (see the module docstring). `images` are paths or (3, H, W) uint8 RGB tensors.

    An item is as DetectionDataset's (image, annotations (none), scale, index, original_size), original_size being
    the window's (height, width): inference.predict then gives each window's detections in the window's pixels.
    An image whose header cannot be read gets no window: `unreadable` maps its position to why. One whose pixels
    cannot be decoded gives placeholder items of original_size (0, 0) instead of stopping every loading process.
    With allow_large, image files past Pillow's pixel limit are read (dataloader.py)."""

    def __init__(self, images: Sequence[str | torch.Tensor], min_size: int, max_size: int,
                 tile_size: int | None = None, overlap: float = DEFAULT_OVERLAP, allow_large: bool = False):
        if tile_size is not None:
            check_tiling(tile_size, overlap)
        self.images = list(images)
        self.allow_large = allow_large
        self.resize = Resize(min_size, max_size)
        self.sizes: list[tuple[int, int] | None] = [None] * len(self.images)
        self.unreadable: dict[int, str] = {}
        self.windows: list[Window] = []
        for number, image in enumerate(self.images):
            try:
                self.sizes[number] = image_size(image, allow_large)
            except ValueError as error:
                self.unreadable[number] = str(error)
                continue
            self.windows += self._windows_of(number, tile_size, overlap)
        self._decoded: tuple[int | None, torch.Tensor | None] = (None, None)

    def _windows_of(self, number: int, tile_size: int | None, overlap: float) -> list[Window]:
        height, width = self.sizes[number]
        if tile_size is None or (height <= tile_size and width <= tile_size):
            return [Window(number, (0, 0, width, height), self.resize.scale_for(height, width))]
        scale = self.resize.scale_for(tile_size, tile_size)
        return [Window(number, box, scale) for box in tile_windows(height, width, tile_size, overlap)]

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each window, as the model sees it before resizing: what batches are grouped by."""
        return [(y2 - y1, x2 - x1) for _, (x1, y1, x2, y2), _ in self.windows]

    def _image(self, number: int) -> torch.Tensor | None:
        """Image `number` decoded, or None if its pixels cannot be. It is kept for the next window: one loading
        process reads a batch's windows in order, so that a tiled image is decoded about once a batch."""
        if self._decoded[0] != number:
            image = self.images[number]
            try:
                decoded = image if isinstance(image, torch.Tensor) else read_rgb_image(image, self.allow_large)
                self._decoded = (number, decoded)
            except ValueError:  # said again by undecodable_reason, in the main process
                self._decoded = (number, None)
        return self._decoded[1]

    def __getitem__(self, index: int) -> dict:
        number, (x1, y1, x2, y2), scale = self.windows[index]
        image = self._image(number)
        if image is None:
            image, scale, original_size = torch.zeros((3, 1, 1), dtype=torch.uint8), 1.0, (0, 0)
        else:
            image, original_size = resize_image(image[:, y1:y2, x1:x2], scale), (y2 - y1, x2 - x1)
        return {"image": image, "annotations": torch.zeros((0, 5)), "difficult": torch.zeros(0, dtype=torch.bool),
                "scale": scale, "index": index, "original_size": original_size}

    def unread_reason(self, number: int) -> str:
        """Why image `number` has no prediction: its header could not be read, or its pixels not decoded."""
        return self.unreadable.get(number) or self.undecodable_reason(number)

    def undecodable_reason(self, number: int) -> str:
        """Why image `number` failed to decode in a loading process: the error of decoding it again here."""
        try:
            read_rgb_image(self.images[number], self.allow_large)
        except ValueError as error:
            return str(error)
        return (f"{self.images[number]}: could not be decoded while predicting, though it can now (was it being "
                f"written?)")


def describe_windows(dataset: ImageWindows, tile_size: int | None) -> str:
    """What the model sees of the images, in words."""
    whole = (f"resized to a shorter side of {dataset.resize.min_size} pixels, the longer at most "
             f"{dataset.resize.max_size}")
    if tile_size is None:
        return f"whole, {whole}"
    scale = dataset.resize.scale_for(tile_size, tile_size)
    return (f"those larger than {tile_size} x {tile_size} pixels cut into tiles of that size, each resized by "
            f"{scale:.3g}, the others whole, {whole}: {len(dataset)} windows")


# ------------------------------------------------------------------------------------------------ merging


def contains(regions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Whether each region (..., 4) holds the box (..., 4) at the same place whole, all x1, y1, x2, y2: (...)."""
    return ((boxes[..., :2] >= regions[..., :2]) & (boxes[..., 2:] <= regions[..., 2:])).all(dim=-1)


def held_whole_elsewhere(boxes: torch.Tensor, tile_of_box: torch.Tensor, tiles: torch.Tensor,
                         image_size: tuple[int, int], margin: float) -> torch.Tensor:
    """(D,) whether each of the (D, 4) boxes, found in the tiles (N, 4) `tile_of_box` (D,) says, is cut by a side of
    its tile lying inside the image (reaches within `margin` of it) while another tile holds it whole, `margin` away
    from its own sides inside the image. All in the image's pixels."""
    height, width = image_size
    inner_sides = torch.stack([tiles[:, 0] > 0, tiles[:, 1] > 0, tiles[:, 2] < width, tiles[:, 3] < height],
                              dim=1)  # 4 x (N,) -> (N, 4): which sides lie inside the image
    interiors = tiles + inner_sides * torch.tensor([margin, margin, -margin, -margin])  # (N, 4)
    cut = ~contains(interiors[tile_of_box], boxes)  # (D,): the image's own edges cut nothing, boxes end there
    held = contains(interiors[None], boxes[cut][:, None]).any(dim=1)  # (1, N, 4) with (C, 1, 4) -> (C, N) -> (C,)
    return torch.zeros_like(cut).masked_scatter(cut, held)  # (D,)


def merge_tiles(windows: Sequence[Window], predictions: Sequence[dict[str, np.ndarray]],
                image_size: tuple[int, int], nms_threshold: float) -> dict[str, np.ndarray]:
    """One image's detections from those of its windows (each in its window's pixels, as inference.predict gives
    them): an image seen whole keeps them as they are; a tiled one gets them shifted into its own pixels, without
    the cut boxes that another tile holds whole, merged by class-wise NMS. Returns inference.predict's dict."""
    if len(windows) == 1:
        return predictions[0]
    tiles = torch.tensor([window.box for window in windows], dtype=torch.float32)  # (N, 4)
    counts = torch.tensor([len(prediction["scores"]) for prediction in predictions])  # (N,)
    tile_of_box = torch.repeat_interleave(torch.arange(len(windows)), counts)  # (D,)
    boxes, scores, labels = (torch.from_numpy(np.concatenate([prediction[key] for prediction in predictions]))
                             for key in ("boxes", "scores", "labels"))  # (D, 4), (D,), (D,)
    boxes = boxes + tiles[tile_of_box, :2].repeat(1, 2)  # (D, 4) + (D, 2 * 2): x1, y1, x1, y1 of each box's tile
    margin = SIDE_MARGIN / windows[0].scale
    kept = torch.nonzero(~held_whole_elsewhere(boxes, tile_of_box, tiles, image_size, margin)).squeeze(1)  # (D',)
    order = kept[batched_nms(boxes[kept], scores[kept], labels[kept], nms_threshold)]  # by decreasing score
    return {"boxes": boxes[order].numpy(), "scores": scores[order].numpy(), "labels": labels[order].numpy(),
            "image_size": image_size}


# ---------------------------------------------------------------------------------------------- prediction


def predict_windows(model: nn.Module, dataset: ImageWindows, batch_size: int = 8,
                    workers: int = 0) -> list[dict[str, np.ndarray] | None]:
    """Detect with `model` (in eval mode, on its device; in fp16 mixed precision on a GPU) on every window of
    `dataset`, `batch_size` windows at a time, and merge each image's windows (merge_tiles). Returns, per image,
    inference.predict's dict in the image's pixels, or None for an image that could not be read: its position is
    then in dataset.unreadable, or its windows failed to decode (dataset.unread_reason says why)."""
    predictions: list[dict[str, np.ndarray] | None] = [None] * len(dataset)
    if len(dataset):  # no window: no image could be read
        loader = inference_loader(dataset, batch_size, workers, pin_memory=next(model.parameters()).is_cuda)
        for index, prediction in tqdm(predict(model, loader), total=len(dataset), desc="detecting", unit="window"):
            predictions[index] = prediction
    merged: list[dict[str, np.ndarray] | None] = [None] * len(dataset.images)
    for number, pairs in itertools.groupby(zip(dataset.windows, predictions), key=lambda pair: pair[0].image):
        windows, window_predictions = zip(*pairs)
        if None not in window_predictions:  # None: a window of an image that could not be decoded
            merged[number] = merge_tiles(windows, window_predictions, dataset.sizes[number],
                                         model.settings.nms_threshold)
    return merged


def predict_tiled(model: nn.Module, image: str | torch.Tensor, tile_size: int, overlap: float = DEFAULT_OVERLAP,
                  batch_size: int = 8) -> dict[str, np.ndarray]:
    """Detect with `model` (in eval mode) on one image, a file or a (3, H, W) uint8 RGB tensor, cut into tiles of
    tile_size x tile_size pixels that overlap by at least `overlap` of a tile, `batch_size` tiles at a time. Returns
    {"boxes": (D, 4) x1, y1, x2, y2 in the image's pixels, "scores": (D,), "labels": (D,), "image_size": (height,
    width)}, by decreasing score. Raises ValueError for an image that cannot be read."""
    dataset = ImageWindows([image], model.settings.min_size, model.settings.max_size, tile_size, overlap)
    prediction = predict_windows(model, dataset, batch_size)[0]
    if prediction is None:
        raise ValueError(dataset.unread_reason(0))
    return prediction
