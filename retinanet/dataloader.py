"""Input pipeline: detection datasets (CSV and COCO), the transforms of paper §4, batching, aspect-ratio grouping,
and a synthetic "shapes" data set to try everything on a CPU.

The transforms follow the paper's training and inference setup (§4.1 "Inference and Training", §5): images are
resized so that their shorter side is 800 pixels, the image scale of the paper's main models (Detectron caps the
longer side at 1333), and "We use horizontal image flipping as the only form of data augmentation unless
otherwise noted" (§4.1 "Optimization"); optional scale jitter draws the shorter side per training image, as for
the paper's final COCO models (Table 2). Batches hold images of one orientation only (landscape or portrait), as
in detectron2's aspect ratio grouping, so that little of a padded batch is padding.

An item of every dataset is a dict:
    image:         (3, H, W) float32, RGB, resized, maybe flipped, normalised with the ImageNet mean and std
    annotations:   (N, 5) float32 rows x1, y1, x2, y2 (pixels of the resized image), class index 0..K-1
    scale:         resized size / original size; boxes / scale are in the original image's pixels
    index:         the dataset index
    original_size: (height, width) of the image file

Legend for shapes: B batch, N boxes, H, W image size.
"""

import colorsys
import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import skimage.data
import skimage.draw
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from .files import write_text_atomically

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision's ImageNet backbones were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
PADDING_ROW = -1.0  # value of the annotation rows that collate adds; the loss skips rows with class < 0
ANNOTATION_COLUMNS = "path,x1,y1,x2,y2,class_name"
CLASS_COLUMNS = "class_name,id"
MAX_LISTED = 5  # how many missing files or ids an error message lists

# (image (3, H, W) float in [0, 1], boxes (N, 4)) -> (image, boxes, scale); see DetectionTransform
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, float]]


# ---------------------------------------------------------------------------------------------------- images


def require_file(path: str, what: str = "file") -> None:
    """Raise ValueError naming `path` unless it is an existing file (a directory is not)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: {what} expected, found a directory")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} not found")


@contextlib.contextmanager
def _image_errors_as_value_error(path: str) -> Iterator[None]:
    """Turn Pillow's errors for `path` into a ValueError naming the file; refuse decompression bombs."""
    require_file(path, "image file")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an error refuses the file either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(
                f"{path}: image refused as a possible decompression bomb ({error}); if the file is trusted, "
                f"raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS})"
            ) from error
        # SyntaxError: Pillow's PNG reader raises it for a corrupt chunk in the middle of a file.
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path}: cannot decode image: {error}") from error


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, read from its header without decoding the pixels."""
    with _image_errors_as_value_error(path), Image.open(path) as image:
        return image.size


def read_rgb_image(path: str) -> torch.Tensor:
    """Decode an image file into a (3, H, W) uint8 RGB tensor, whatever the stored mode.

    Grayscale and palette images are expanded to RGB, alpha is dropped, and 16-bit images are scaled to 8 bits
    (65535 -> 255) instead of being saturated as Pillow's convert("RGB") would. Raises ValueError naming the file
    if it is missing, undecodable, truncated or larger than PIL.Image.MAX_IMAGE_PIXELS.
    """
    with _image_errors_as_value_error(path), Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit gray ("I" holds it in older Pillow)
            gray = np.round(np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8)
            array = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        else:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def clip_to_image(annotations: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5) annotations with boxes clipped to the image, and the (N,) mask of those that keep some area."""
    clipped = annotations.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    return clipped, (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


def clip_annotations(annotations: np.ndarray, height: int, width: int, image_path: str) -> np.ndarray:
    """Clip (N, 5) boxes to the image; drop, with a warning naming the image, those left without area."""
    clipped, keep = clip_to_image(annotations, height, width)
    if not keep.all():
        warnings.warn(
            f"{image_path}: dropped {int((~keep).sum())} box(es) lying outside the {width}x{height} image",
            stacklevel=2,
        )
    return clipped[keep]


# ------------------------------------------------------------------------------------------------ transforms


class Resize:
    """Resize so the shorter side is min_size unless the longer side would exceed max_size; then the longer side
    is max_size (the paper's 800 pixels; Detectron's cap of 1333). min_size = (lo, hi) is scale jitter: the
    shorter side is drawn uniformly from the integers lo..hi for each image (training only).

    Called on (image (3, H, W), boxes (N, 4)), returns (image, boxes, scale): boxes are multiplied by scale.
    """

    def __init__(self, min_size: int | tuple[int, int] = 800, max_size: int = 1333):
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

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        height, width = image.shape[-2:]
        scale = self.scale_for(height, width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.interpolate(
            image[None], size=(new_height, new_width), mode="bilinear", antialias=True, align_corners=False
        )[0]  # (1, 3, H, W) -> (3, H', W')
        boxes = boxes * scale
        # Rounding the image size can cut up to half a pixel off the far edges; keep boxes inside the image.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_height)
        return image, boxes, scale


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


class Normalize:
    """Subtract the per-channel mean and divide by the std (ImageNet's, which the pretrained backbone expects)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=image.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(3, 1, 1)
        return (image - mean) / std, boxes


class DetectionTransform:
    """The whole pipeline of one item: resize (if any), flip (if any), normalise.

    Called on (image (3, H, W) float in [0, 1], boxes (N, 4)), returns (image, boxes, scale), where scale is the
    resize factor (1.0 without a resize); the dataset reports it as item["scale"]. A custom `transform` given to a
    dataset must follow the same contract and keep the boxes in number and order.
    """

    def __init__(
        self,
        resize: Resize | None = None,
        flip: RandomHorizontalFlip | None = None,
        normalize: Normalize | None = None,
    ):
        self.resize = resize
        self.flip = flip
        self.normalize = normalize or Normalize()

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        scale = 1.0
        if self.resize is not None:
            image, boxes, scale = self.resize(image, boxes)
        if self.flip is not None:
            image, boxes = self.flip(image, boxes)
        image, boxes = self.normalize(image, boxes)
        return image, boxes, scale


def build_transform(
    train: bool, min_size: int = 800, max_size: int = 1333, jitter: tuple[int, int] | None = None
) -> DetectionTransform:
    """Training: resize (to min_size, or a shorter side drawn from the jitter range) + flip + normalise.
    Evaluation: resize to min_size + normalise; jitter is a training setting and does not apply."""
    if train:
        return DetectionTransform(Resize(jitter or min_size, max_size), RandomHorizontalFlip(0.5))
    return DetectionTransform(Resize(min_size, max_size))


# -------------------------------------------------------------------------------------------------- datasets


def _raise_if_missing(source: str, paths: Sequence[str], where: Sequence[str]) -> None:
    """Fail at construction, not hours into training, if image files are missing; list the first few."""
    missing = [f"{place}: {path}" for path, place in zip(paths, where) if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(paths)} image files not found, e.g. " + "; ".join(missing[:MAX_LISTED])
        )


class DetectionDataset(Dataset):
    """What every dataset here shares: image paths, (N, 5) annotations in original pixels, class names, and
    `__getitem__`, which reads, clips, transforms and returns the item dict described in the module docstring."""

    def __init__(
        self,
        image_paths: list[str],
        annotations: list[np.ndarray],
        class_names: list[str],
        transform: Transform | None = None,
    ):
        self.image_paths = image_paths
        self.annotations = annotations
        self.class_names = class_names
        self.transform = transform if transform is not None else DetectionTransform()  # None: just normalise

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def image_path(self, index: int) -> str:
        """Path of the image file of item `index`."""
        return self.image_paths[index]

    def load_annotations(self, index: int) -> np.ndarray:
        """(N, 5) float32 rows x1, y1, x2, y2, class index, in pixels of the image file, as annotated."""
        return self.annotations[index].copy()

    def aspect_ratio(self, index: int) -> float:
        """Width / height of the image file, read from its header."""
        width, height = read_image_size(self.image_paths[index])
        return width / height

    def __getitem__(self, index: int) -> dict:
        path = self.image_paths[index]
        image = read_rgb_image(path).float() / 255.0  # (3, H, W) in [0, 1]
        height, width = image.shape[1:]
        annotations = clip_annotations(self.annotations[index], height, width, path)  # (N, 5)
        image, boxes, scale = self.transform(image, torch.from_numpy(annotations[:, :4]))
        if boxes.shape != (len(annotations), 4):
            raise ValueError(f"{path}: transform returned boxes of shape {tuple(boxes.shape)} for "
                             f"{len(annotations)} boxes; a transform must keep every box, in order")
        labels = torch.from_numpy(annotations[:, 4:])  # (N, 1)
        return {
            "image": image,
            "annotations": torch.cat([boxes, labels], dim=1),  # (N, 4) + (N, 1) -> (N, 5)
            "scale": float(scale),
            "index": index,
            "original_size": (height, width),
        }


def _csv_error(path: str, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {problem}")


def _read_csv_rows(path: str, columns: str) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their 1-based line numbers. A UTF-8 byte-order mark and CRLF line ends are fine."""
    require_file(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise _csv_error(path, line, f"not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8") from error
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise _csv_error(path, reader.line_num, f"malformed CSV ({error})") from error
    if not rows:
        raise _csv_error(path, 1, f"the file is empty; expected rows '{columns}'")
    return rows


def _no_header_hint(line: int) -> str:
    return " (this format has no header row: delete line 1 if it is one)" if line == 1 else ""


def read_class_list(path: str) -> list[str]:
    """Class names from rows `class_name,id`, the ids 0..K-1 each once. Returns the names, index = id."""
    id_of_name: dict[str, int] = {}
    line_of_id: dict[int, int] = {}
    for line, row in _read_csv_rows(path, CLASS_COLUMNS):
        if len(row) != 2:
            raise _csv_error(path, line, f"{len(row)} columns, expected 2: {CLASS_COLUMNS}")
        name, id_text = row
        if not name:
            raise _csv_error(path, line, f"empty class name; expected {CLASS_COLUMNS}")
        if not re.fullmatch(r"-?[0-9]+", id_text.strip()):
            raise _csv_error(path, line, f"class id {id_text!r} is not an integer{_no_header_hint(line)}")
        class_id = int(id_text)
        if name in id_of_name:
            raise _csv_error(path, line, f"duplicate class name {name!r}; each class is listed once")
        if class_id in line_of_id:
            raise _csv_error(path, line, f"duplicate class id {class_id} (also on line {line_of_id[class_id]})")
        id_of_name[name] = class_id
        line_of_id[class_id] = line
    num_classes = len(id_of_name)
    for class_id, line in line_of_id.items():
        if not 0 <= class_id < num_classes:
            missing = sorted(set(range(num_classes)) - set(line_of_id))[:MAX_LISTED]
            raise _csv_error(
                path, line, f"class id {class_id} out of range: the {num_classes} ids must be 0..{num_classes - 1}, "
                f"each once (missing: {missing})"
            )
    return sorted(id_of_name, key=id_of_name.get)


def _parse_annotation_row(
    path: str, line: int, row: list[str], class_index: dict[str, int]
) -> tuple[str, list[float] | None]:
    """One row `path,x1,y1,x2,y2,class_name` -> (image path, [x1, y1, x2, y2, class index]); the box is None
    for `path,,,,,`, an image without objects."""
    if len(row) != 6:
        raise _csv_error(path, line, f"{len(row)} columns, expected 6: {ANNOTATION_COLUMNS}")
    image, *fields = row
    if not image:
        raise _csv_error(path, line, f"empty image path; expected {ANNOTATION_COLUMNS}")
    if not any(fields):
        return image, None
    if not all(fields):
        raise _csv_error(path, line, "some fields are empty: fill x1,y1,x2,y2,class_name, or leave all five empty "
                         "for an image without objects")
    coordinates = []
    for column, text in zip(("x1", "y1", "x2", "y2"), fields):
        try:
            value = float(text)
        except ValueError as error:
            raise _csv_error(path, line, f"{column} {text!r} is not a number{_no_header_hint(line)}") from error
        if not math.isfinite(value) or value < 0:
            raise _csv_error(path, line, f"{column} is {text!r}; expected a finite number >= 0 (pixels)")
        coordinates.append(value)
    x1, y1, x2, y2 = coordinates
    if x2 <= x1 or y2 <= y1:
        raise _csv_error(path, line, f"empty box ({x1}, {y1}, {x2}, {y2}); expected x2 > x1 and y2 > y1")
    name = fields[4]
    if name not in class_index:
        raise _csv_error(path, line, f"unknown class {name!r}; the class list has {list(class_index)[:20]}")
    return image, [x1, y1, x2, y2, float(class_index[name])]


class CSVAnnotations(NamedTuple):
    """The rows of a CSV annotation file, grouped by image in the order images first appear."""

    boxes_of_image: dict[str, list[list[float]]]  # absolute image path -> rows x1, y1, x2, y2, class index
    first_line: dict[str, int]  # image path -> the line it first appears on
    errors: list[ValueError]  # one per malformed row, each naming the file and the line


def read_csv_annotations(train_file: str, class_names: list[str]) -> CSVAnnotations:
    """Parse every row of `train_file`. A malformed row is recorded in `errors` rather than raised, so that a
    data check can list every problem at once; relative image paths are resolved against the file's folder."""
    class_index = {name: index for index, name in enumerate(class_names)}
    parsed = CSVAnnotations({}, {}, [])
    folder = os.path.dirname(os.path.abspath(train_file))
    for line, row in _read_csv_rows(train_file, ANNOTATION_COLUMNS):
        try:
            image, box = _parse_annotation_row(train_file, line, row, class_index)
        except ValueError as error:
            parsed.errors.append(error)
            continue
        image_path = os.path.join(folder, image)  # an absolute path stays as it is
        parsed.first_line.setdefault(image_path, line)
        parsed.boxes_of_image.setdefault(image_path, [])
        if box is not None:
            parsed.boxes_of_image[image_path].append(box)
    return parsed


class CSVDataset(DetectionDataset):
    """Boxes from a CSV file in yhenon/pytorch-retinanet's format.

    train_file rows: `path,x1,y1,x2,y2,class_name`, several rows per image, `path,,,,,` for an image without
    objects; relative paths are relative to the CSV file's folder. class_list rows: `class_name,id`, ids 0..K-1.
    Neither file has a header. Malformed rows raise ValueError naming the file and line.
    """

    def __init__(self, train_file: str, class_list: str, transform: Transform | None = None):
        class_names = read_class_list(class_list)
        parsed = read_csv_annotations(train_file, class_names)
        if parsed.errors:
            more = len(parsed.errors) - 1
            hint = f" (and {more} more malformed row(s): train.py --check_data lists them all)" if more else ""
            raise ValueError(f"{parsed.errors[0]}{hint}") from parsed.errors[0]
        image_paths = list(parsed.boxes_of_image)
        _raise_if_missing(train_file, image_paths, [f"line {parsed.first_line[path]}" for path in image_paths])
        annotations = [np.array(boxes, dtype=np.float32).reshape(-1, 5) for boxes in parsed.boxes_of_image.values()]
        super().__init__(image_paths, annotations, class_names, transform)


# The keys each entry of a COCO instances file needs here, by section.
COCO_REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _check_coco_structure(path: str, dataset) -> None:
    """Raise ValueError naming the file and the entry for what would otherwise fail deep inside pycocotools or
    training: missing sections or keys, an image or category listed twice, a box that is not 4 numbers, an
    annotation of an image that is not listed."""
    if not isinstance(dataset, dict) or any(section not in dataset for section in COCO_REQUIRED_KEYS):
        found = sorted(dataset) if isinstance(dataset, dict) else type(dataset).__name__
        raise ValueError(f"{path}: not a COCO instances file: expected the sections {list(COCO_REQUIRED_KEYS)}, "
                         f"found {found}")
    for section, keys in COCO_REQUIRED_KEYS.items():
        for position, entry in enumerate(dataset[section]):
            missing = [key for key in keys if key not in entry] if isinstance(entry, dict) else list(keys)
            if missing:
                raise ValueError(f"{path}: {section}[{position}] lacks {missing}; each entry needs {list(keys)}")
    for section in ("images", "categories"):
        counts = Counter(entry["id"] for entry in dataset[section])
        repeated = [entry_id for entry_id, count in counts.items() if count > 1]
        if repeated:
            raise ValueError(f"{path}: {section} id(s) {repeated[:MAX_LISTED]} listed more than once")
    image_ids = {image["id"] for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        bbox = annotation["bbox"]
        is_numbers = isinstance(bbox, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        if not (is_numbers and len(bbox) == 4):
            raise ValueError(f"{path}: annotation {annotation['id']} has bbox {bbox!r}; expected [x, y, width, height]")
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {annotation['id']} is of image_id {annotation['image_id']}, "
                             f"which is not in 'images'")


def _load_coco(annotation_file: str) -> COCO:
    """A pycocotools COCO object, with errors that name the file and without pycocotools' progress prints."""
    require_file(annotation_file, "COCO annotation file")
    with open(annotation_file, encoding="utf-8") as file:
        try:
            dataset = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{annotation_file}: not valid JSON ({error})") from error
    _check_coco_structure(annotation_file, dataset)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDataset(DetectionDataset):
    """Boxes from `{root}/annotations/instances_{set_name}.json`, images from `{root}/images/{set_name}/` or
    `{root}/{set_name}/`. COCO category ids (sorted) map to class indices 0..K-1 and back. Crowd boxes are
    skipped, zero-area boxes dropped with a warning, images without boxes kept as negatives. Missing image files
    raise ValueError unless check_files is False (retinanet.check then reports each one)."""

    def __init__(self, root: str, set_name: str, transform: Transform | None = None, check_files: bool = True):
        annotation_file = os.path.join(root, "annotations", f"instances_{set_name}.json")
        self.annotation_file = annotation_file  # problems found later (retinanet.check) name it
        self.coco = _load_coco(annotation_file)
        image_dirs = [os.path.join(root, "images", set_name), os.path.join(root, set_name)]
        image_dir = next((folder for folder in image_dirs if os.path.isdir(folder)), None)
        if image_dir is None:
            raise ValueError(f"{root}: no image folder for {set_name!r}; expected {' or '.join(image_dirs)}")
        category_ids = sorted(self.coco.cats)
        self.coco_id_to_label = {coco_id: label for label, coco_id in enumerate(category_ids)}
        self.label_to_coco_id = {label: coco_id for coco_id, label in self.coco_id_to_label.items()}
        self.image_ids = sorted(self.coco.imgs)  # dataset index -> COCO image id
        image_paths = [os.path.join(image_dir, self.coco.imgs[image_id]["file_name"]) for image_id in self.image_ids]
        if check_files:
            _raise_if_missing(annotation_file, image_paths, [f"image id {image_id}" for image_id in self.image_ids])
        zero_area: list[int] = []
        annotations = [self._boxes_of_image(image_id, annotation_file, zero_area) for image_id in self.image_ids]
        if zero_area:
            warnings.warn(f"{annotation_file}: dropped {len(zero_area)} zero-area box(es), annotation ids "
                          f"{zero_area[:MAX_LISTED]}", stacklevel=2)
        class_names = [self.coco.cats[coco_id]["name"] for coco_id in category_ids]
        super().__init__(image_paths, annotations, class_names, transform)

    def _boxes_of_image(self, image_id: int, annotation_file: str, zero_area: list[int]) -> np.ndarray:
        """(N, 5) x1, y1, x2, y2, class index of the image's non-crowd boxes; appends zero-area ids to zero_area."""
        rows = []
        for annotation in self.coco.imgToAnns[image_id]:
            if annotation.get("iscrowd", 0):
                continue
            if annotation["category_id"] not in self.coco_id_to_label:
                raise ValueError(f"{annotation_file}: annotation {annotation['id']} has category_id "
                                 f"{annotation['category_id']}, which is not in 'categories'")
            x, y, width, height = annotation["bbox"]
            if width <= 0 or height <= 0:
                zero_area.append(annotation["id"])
                continue
            rows.append([x, y, x + width, y + height, self.coco_id_to_label[annotation["category_id"]]])
        return np.array(rows, dtype=np.float32).reshape(-1, 5)

    def aspect_ratio(self, index: int) -> float:
        """Width / height from the COCO json."""
        image_info = self.coco.imgs[self.image_ids[index]]
        return image_info["width"] / image_info["height"]


# -------------------------------------------------------------------------------------------------- batching


def collate(batch: list[dict], size_divisible: int = 32) -> dict:
    """Stack dataset items into a batch: images zero-padded at the bottom and right to a common size, annotations
    padded with rows of -1 to the largest box count.

    Returns {"images": (B, 3, Hp, Wp), "annotations": (B, Nmax, 5), "scales": (B,), "indices": list of B ints,
    "original_sizes": list of B (height, width)}.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    # Multiples of 32: C3..C5 (strides 8, 16, 32) then tile the padded image exactly, so that each upsampled cell
    # of FPN's top-down path lies on the 2x2 lateral cells it is added to; P6 and P7 (strides 64, 128) round up.
    padded_height = math.ceil(max(item["image"].shape[1] for item in batch) / size_divisible) * size_divisible
    padded_width = math.ceil(max(item["image"].shape[2] for item in batch) / size_divisible) * size_divisible
    max_boxes = max(item["annotations"].shape[0] for item in batch)
    images = torch.zeros(len(batch), 3, padded_height, padded_width)  # (B, 3, Hp, Wp)
    annotations = torch.full((len(batch), max_boxes, 5), PADDING_ROW)  # (B, Nmax, 5)
    for i, item in enumerate(batch):
        _, height, width = item["image"].shape
        images[i, :, :height, :width] = item["image"]  # (3, H, W) into the top-left of (3, Hp, Wp)
        annotations[i, : len(item["annotations"])] = item["annotations"]  # (N, 5) into the top of (Nmax, 5)
    return {
        "images": images,
        "annotations": annotations,
        "scales": torch.tensor([item["scale"] for item in batch], dtype=torch.float32),  # (B,)
        "indices": [item["index"] for item in batch],
        "original_sizes": [item["original_size"] for item in batch],
    }


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images share one orientation (landscape, width >= height, or portrait), as
    detectron2's aspect ratio grouping: fill one bucket per orientation in (shuffled) order, emit a bucket when
    full; what is left at the end of the epoch becomes a smaller batch unless drop_last.

    Distributed (num_replicas > 1): every rank builds the same batches from the same seed + epoch and takes every
    num_replicas-th one, so the ranks' batches are disjoint and together hold each image once per epoch. The list
    of batches is padded by repeating batches from its start (as DistributedSampler repeats indices) so that
    every rank yields the same number of batches: a rank with fewer batches would leave the others waiting in
    their gradient all-reduce.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if len(aspect_ratios) == 0:
            raise ValueError("AspectRatioBatchSampler needs at least one aspect ratio")
        if not all(math.isfinite(ratio) and ratio > 0 for ratio in aspect_ratios):
            raise ValueError("aspect ratios must be finite and positive (width / height)")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < num_replicas, got batch_size={batch_size}, "
                             f"rank={rank}, num_replicas={num_replicas}")
        self.is_landscape = [ratio >= 1.0 for ratio in aspect_ratios]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle with seed + epoch from now on; call it at the start of every epoch."""
        self.epoch = epoch

    def _grouped_batches(self) -> list[list[int]]:
        """All batches of the epoch, over all ranks."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.is_landscape), generator=generator).tolist()
        else:
            order = range(len(self.is_landscape))
        buckets: tuple[list[int], list[int]] = ([], [])  # portrait, landscape
        batches = []
        for index in order:
            bucket = buckets[self.is_landscape[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        if not self.drop_last:
            batches += [bucket for bucket in buckets if bucket]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._grouped_batches()
        total = len(self) * self.num_replicas  # drop_last cuts the tail, otherwise repeat from the start
        batches = list(itertools.islice(itertools.cycle(batches), total))
        return iter(batches[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """The number of batches this rank yields per epoch."""
        num_landscape = sum(self.is_landscape)
        counts = (num_landscape, len(self.is_landscape) - num_landscape)
        if self.drop_last:
            return sum(count // self.batch_size for count in counts) // self.num_replicas
        return math.ceil(sum(math.ceil(count / self.batch_size) for count in counts) / self.num_replicas)


# ---------------------------------------------------------------------------------------- shapes demo data

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
