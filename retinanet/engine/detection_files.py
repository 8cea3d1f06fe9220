"""Detections out as files: a trained detector run on any number of image files, folders and CSV annotation files,
whole or tiled (tiling.py), with the detections in each image's own pixels written to a CSV or a COCO-style JSON
file. An image that cannot be read is skipped and said why, not fatal.

Legend for shapes: D detections of an image.
"""

import json
import os
from typing import NamedTuple

import numpy as np

from ..data.annotations import read_csv_image_paths
from ..data.files import write_csv_atomically, write_text_atomically
from ..data.images import find_images
from ..model import RetinaNet
from .tiling import DEFAULT_OVERLAP, ImageWindows, describe_windows, predict_windows

OUTPUT_FORMATS = (".csv", ".json")
DETECTION_COLUMNS = "path,x1,y1,x2,y2,class_name,score"
BOX_DECIMALS = 2  # hundredths of a pixel
SCORE_DECIMALS = 4


# ----------------------------------------------------------------------------------------------------- inputs


def collect_images(inputs: list[str]) -> list[str]:
    """The image paths that `inputs` name, each once, in order: a CSV file (.csv) gives the images of its rows
    (annotations in the training format, read_csv_image_paths), a folder the images in it and its subfolders, any
    other path is an image (a missing one is found missing when read)."""
    image_paths: dict[str, str] = {}  # absolute path -> the path as found
    for path in inputs:
        if path.lower().endswith(".csv"):
            found = read_csv_image_paths(path)
        else:
            found = find_images(path, recursive=True) if os.path.isdir(path) else [path]
        for image_path in found:
            image_paths.setdefault(os.path.abspath(image_path), image_path)
    return list(image_paths.values())


def output_format(path: str) -> str:
    """The format of an output file by its extension: ".csv" or ".json"; ValueError for any other."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: the output file must end in .csv (rows {DETECTION_COLUMNS}) or .json "
                         f"(COCO-style results)")
    return extension


# ----------------------------------------------------------------------------------------------- predicting


class FilePredictions(NamedTuple):
    """What a model found in some image files."""

    image_paths: list[str]  # the images read, in input order
    predictions: list[dict[str, np.ndarray]]  # one per image: boxes (D, 4) in its pixels, scores, labels, image_size
    skipped: dict[str, str]  # image path -> why it could not be read
    class_names: list[str]  # index = label


def predict_images(model: RetinaNet, class_names: list[str], image_paths: list[str], batch_size: int = 8,
                   workers: int = 0, tile_size: int | None = None, tile_overlap: float = DEFAULT_OVERLAP,
                   allow_large: bool = False) -> FilePredictions:
    """Detect with `model` (in eval mode, on its device) on image files, whole, or cut into tiles of tile_size pixels
    where they are larger (tiling.py); `batch_size` counts windows (whole images or tiles). Images that cannot be
    read are skipped; with allow_large, those past Pillow's pixel limit are read."""
    dataset = ImageWindows(image_paths, model.settings.min_size, model.settings.max_size, tile_size, tile_overlap,
                           allow_large)
    print(f"detecting on {len(image_paths)} images ({describe_windows(dataset, tile_size)}), "
          f"score >= {model.settings.score_threshold:g}, on {next(model.parameters()).device}")
    predictions = predict_windows(model, dataset, batch_size, workers)
    skipped = {path: dataset.unread_reason(number)
               for number, (path, prediction) in enumerate(zip(image_paths, predictions)) if prediction is None}
    read = [(path, prediction) for path, prediction in zip(image_paths, predictions) if prediction is not None]
    return FilePredictions([path for path, _ in read], [prediction for _, prediction in read], skipped, class_names)


# ---------------------------------------------------------------------------------------------------- outputs


def detections_of(image_path: str, prediction: dict[str, np.ndarray], class_names: list[str]) -> list[tuple]:
    """(path, x1, y1, x2, y2, class_name, score) of each detection of an image, boxes and scores rounded."""
    boxes = np.round(prediction["boxes"].astype(np.float64), BOX_DECIMALS).tolist()
    scores = np.round(prediction["scores"].astype(np.float64), SCORE_DECIMALS).tolist()
    return [(image_path, *box, class_names[int(label)], score)
            for box, label, score in zip(boxes, prediction["labels"], scores)]


def csv_rows(found: FilePredictions) -> list[tuple]:
    """Rows path,x1,y1,x2,y2,class_name,score, by image and decreasing score; an image without detections has one
    row `path,,,,,,`, so that every image read is in the file."""
    rows = []
    for path, prediction in zip(found.image_paths, found.predictions):
        rows += detections_of(path, prediction, found.class_names) or [(path, "", "", "", "", "", "")]
    return rows


def coco_style_results(found: FilePredictions) -> list[dict]:
    """COCO-style results {"file_name", "bbox": [x, y, width, height], "category_name", "score"}, one a detection."""
    return [{"file_name": path, "bbox": [x1, y1, round(x2 - x1, BOX_DECIMALS), round(y2 - y1, BOX_DECIMALS)],
             "category_name": class_name, "score": score}
            for image_path, prediction in zip(found.image_paths, found.predictions)
            for path, x1, y1, x2, y2, class_name, score in detections_of(image_path, prediction, found.class_names)]


def write_detections(path: str, found: FilePredictions) -> int:
    """Write the detections to `path`, atomically, as CSV or JSON by its extension (output_format). Returns how
    many detections it holds."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if output_format(path) == ".json":
        write_text_atomically(path, json.dumps(coco_style_results(found)))
    else:
        write_csv_atomically(path, csv_rows(found))
    return sum(len(prediction["scores"]) for prediction in found.predictions)
