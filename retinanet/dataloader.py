"""The images a RetinaNet trains and runs on (paper §4.1 "Optimization"): image files decoded, the CSV annotation
format read and checked, each image resized and flipped, and items batched.

- Images are resized so that their shorter side is the model's min_size, 800 pixels for the paper's main models
  (§5.2 "Speed versus Accuracy", Table 1e, and §5.3; Detectron caps the longer side at 1333), and "We use horizontal
  image flipping as the only form of data augmentation unless otherwise noted" (§4.1 "Optimization"). Optional
  scale jitter draws the shorter side per training image, as for §5.3's final models; opt-in augmentations beyond
  the paper's are in data/augmentations.py. Images stay uint8, a quarter of float32's bytes on their way to the
  device; the model normalises them there (model.normalize).
- The CSV format is yhenon/pytorch-retinanet's: rows `path,x1,y1,x2,y2,class_name`, `path,,,,,` for an image
  without objects, and a class list `class_name,id`. Every problem is a ValueError naming the file and the line.
  COCO and Pascal VOC are read by data/coco.py and data/voc.py into the same DetectionDataset.
- Batches hold images of one orientation only (landscape or portrait), as detectron2's aspect ratio grouping, so
  that little of a padded batch is padding. Each training item is asked for by (index, seed): its random
  transforms draw from a generator seeded with it, so that an item is the same whichever worker process loads it,
  and a resumed run sees the same flips, sizes and augmentations as an uninterrupted one.

An item of a dataset is a dict:
    image:         (3, H, W) uint8, RGB, resized, maybe flipped and augmented
    annotations:   (N, 5) float32 rows x1, y1, x2, y2 (pixels of the resized image), class index 0..K-1
    difficult:     (N,) bool, the boxes evaluation neither counts as hits nor as misses (VOC's; training uses them)
    scale:         resized size / original size; without augmentation, boxes / scale are in the original pixels
    index:         the dataset index
    original_size: (height, width) of the image file

Legend for shapes: B batch, N boxes, H, W image size.
"""

import contextlib
import csv
import io
import itertools
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import IO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .anchors import clip_boxes, has_area
from .settings import IMAGENET_MEAN

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what a folder scan picks
ANNOTATION_COLUMNS = "path,x1,y1,x2,y2,class_name"
CLASS_COLUMNS = "class_name,id"
MAX_LISTED = 5  # how many missing files or rows a message lists
MEAN_COLOUR = tuple(round(255 * mean) for mean in IMAGENET_MEAN)  # (124, 116, 104), which normalize takes to ~0
PADDING_ROW = -1.0  # value of the annotation rows that collate adds; the loss skips rows with class < 0

# What a dataset passes through its transforms with an image: "boxes" (N, 4) float32 x1, y1, x2, y2 in its pixels,
# and what follows each box: "labels" (N,) int64 class index, "difficult" (N,) bool.
Target = dict[str, torch.Tensor]
# (image (3, H, W) uint8, target) -> (image, target, scale); see DetectionTransform
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target, float]]


# ------------------------------------------------------------------------------------------------------ files


def require_file(path: str, what: str = "file") -> None:
    """Raise ValueError naming `path` unless it is an existing file (a directory is not)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: {what} expected, found a directory")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} not found")


@contextlib.contextmanager
def _image_errors_as_value_error(path: str, allow_large: bool = False) -> Iterator[None]:
    """Pillow's errors for `path` as a ValueError naming it; past Pillow's pixel limit only with `allow_large`."""
    require_file(path, "image file")
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an error refuses the file either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if allow_large:
                Image.MAX_IMAGE_PIXELS = None  # Pillow reads it when it opens a file: no limit for this one
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{path}: image refused as a possible decompression bomb ({error}); if the file is "
                             f"trusted, read it with allow_large=True (the scripts' --allow_large_images)") from error
        # SyntaxError: Pillow's PNG reader raises it for a corrupt chunk in the middle of a file.
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path}: cannot decode image: {error}") from error
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image_size(path: str, allow_large: bool = False) -> tuple[int, int]:
    """(height, width) of an image file, from its header, without decoding the pixels."""
    with _image_errors_as_value_error(path, allow_large), Image.open(path) as image:
        width, height = image.size
        return height, width


def read_rgb_image(path: str, allow_large: bool = False) -> torch.Tensor:
    """An image file decoded into a (3, H, W) uint8 RGB tensor, whatever its mode: gray and palette images expanded,
    alpha dropped, 16-bit gray scaled to 8 bits (65535 -> 255, where Pillow's convert("RGB") would saturate)."""
    with _image_errors_as_value_error(path, allow_large), Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit gray ("I" holds it in older Pillow)
            gray = np.round(np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8)
            array = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        else:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def find_images(path: str, recursive: bool = False) -> list[str]:
    """[path] for an image file; for a folder, its image files (IMAGE_EXTENSIONS), with `recursive` also those of
    its subfolders, sorted by path."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such image file or folder")
    if recursive:
        candidates = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]
    else:
        candidates = [os.path.join(path, name) for name in os.listdir(path)]
    image_paths = sorted(file for file in candidates if file.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(file))
    if not image_paths:
        where = "this folder or its subfolders" if recursive else "this folder"
        raise ValueError(f"{path}: no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return image_paths


def write_atomically(path: str, write: Callable[[IO], object], binary: bool = False) -> None:
    """`write(file)` into a temporary file, flushed, then renamed to `path`: never half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)  # atomic on POSIX and Windows


def write_text_atomically(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomically(path, lambda file: file.write(text))


# ----------------------------------------------------------------------------------------------- CSV files


def line_error(path: str, line: int, problem: str) -> ValueError:
    """A user's error in an annotation file (CSV or XML), naming the file and the line."""
    return ValueError(f"{path}, line {line}: {problem}")


def read_csv_rows(path: str, columns: str) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their 1-based line numbers; a UTF-8 byte-order mark and CRLF line ends are fine."""
    require_file(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise line_error(path, line, f"not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8") from error
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise line_error(path, reader.line_num, f"malformed CSV ({error})") from error
    if not rows:
        raise line_error(path, 1, f"the file is empty; expected rows '{columns}'")
    return rows


def _no_header_hint(line: int) -> str:
    return " (this format has no header row: delete line 1 if it is one)" if line == 1 else ""


def read_class_list(path: str) -> list[str]:
    """Class names from rows `class_name,id`, the ids 0..K-1 each once; index = id."""
    id_of_name: dict[str, int] = {}
    line_of_id: dict[int, int] = {}
    for line, row in read_csv_rows(path, CLASS_COLUMNS):
        if len(row) != 2:
            raise line_error(path, line, f"{len(row)} columns, expected 2: {CLASS_COLUMNS}")
        name, id_text = row
        if not name:
            raise line_error(path, line, f"empty class name; expected {CLASS_COLUMNS}")
        if not re.fullmatch(r"-?[0-9]+", id_text.strip()):
            raise line_error(path, line, f"class id {id_text!r} is not an integer{_no_header_hint(line)}")
        class_id = int(id_text)
        if name in id_of_name:
            raise line_error(path, line, f"duplicate class name {name!r}; each class is listed once")
        if class_id in line_of_id:
            raise line_error(path, line, f"duplicate class id {class_id} (also on line {line_of_id[class_id]})")
        id_of_name[name], line_of_id[class_id] = class_id, line
    for class_id, line in line_of_id.items():
        if not 0 <= class_id < len(id_of_name):
            missing = sorted(set(range(len(id_of_name))) - set(line_of_id))[:MAX_LISTED]
            raise line_error(path, line, f"class id {class_id} out of range: the {len(id_of_name)} ids must be "
                             f"0..{len(id_of_name) - 1}, each once (missing: {missing})")
    return sorted(id_of_name, key=id_of_name.get)


def split_annotation_row(path: str, line: int, row: list[str]) -> tuple[str, list[str]]:
    """One row `path,x1,y1,x2,y2,class_name` -> (image path, its 5 other fields), if it has 6 columns and a path."""
    if len(row) != 6:
        raise line_error(path, line, f"{len(row)} columns, expected 6: {ANNOTATION_COLUMNS}")
    if not row[0]:
        raise line_error(path, line, f"empty image path; expected {ANNOTATION_COLUMNS}")
    return row[0], row[1:]


class DegenerateBox(ValueError):
    """A CSV row whose box has no area: `kind` says how ("zero width or height", or "corners swapped")."""

    def __init__(self, message: str, kind: str, image: str):
        super().__init__(message)
        self.kind, self.image = kind, image  # the image path as the row writes it


def parse_annotation_row(path: str, line: int, row: list[str],
                         class_index: dict[str, int]) -> tuple[str, list[float] | None]:
    """One row -> (image path, [x1, y1, x2, y2, class index]), or (image path, None) for `path,,,,,`."""
    image, fields = split_annotation_row(path, line, row)
    if not any(fields):
        return image, None
    if not all(fields):
        raise line_error(path, line, "some fields are empty: fill x1,y1,x2,y2,class_name, or leave all five empty "
                         "for an image without objects")
    coordinates = []
    for column, text in zip(("x1", "y1", "x2", "y2"), fields):
        try:
            coordinates.append(float(text))
        except ValueError as error:
            raise line_error(path, line, f"{column} {text!r} is not a number{_no_header_hint(line)}") from error
        if not math.isfinite(coordinates[-1]) or coordinates[-1] < 0:
            raise line_error(path, line, f"{column} is {text!r}; expected a finite number >= 0 (pixels)")
    x1, y1, x2, y2 = coordinates
    if x2 <= x1 or y2 <= y1:
        kind = "corners swapped (x2 < x1 or y2 < y1)" if x2 < x1 or y2 < y1 else "zero width or height"
        message = f"empty box ({x1}, {y1}, {x2}, {y2}); expected x2 > x1 and y2 > y1"
        raise DegenerateBox(str(line_error(path, line, message)), kind, image)
    if fields[4] not in class_index:
        raise line_error(path, line, f"unknown class {fields[4]!r}; the class list has {list(class_index)[:20]}")
    return image, [x1, y1, x2, y2, float(class_index[fields[4]])]


class CSVAnnotations(NamedTuple):
    """The rows of a CSV annotation file, grouped by image in the order images first appear."""

    boxes_of_image: dict[str, list[list[float]]]  # absolute image path -> rows x1, y1, x2, y2, class index
    first_line: dict[str, int]  # image path -> the line it first appears on
    errors: list[ValueError]  # one per malformed row, each naming the file and the line
    dropped: list[DegenerateBox]  # with drop_degenerate: the rows of boxes without area, left out


def read_csv_annotations(train_file: str, class_names: list[str], drop_degenerate: bool = False) -> CSVAnnotations:
    """Every row of `train_file`, a malformed one kept in `errors` (a data check lists them all)."""
    class_index = {name: index for index, name in enumerate(class_names)}
    parsed = CSVAnnotations({}, {}, [], [])
    folder = os.path.dirname(os.path.abspath(train_file))
    for line, row in read_csv_rows(train_file, ANNOTATION_COLUMNS):
        try:
            image, box = parse_annotation_row(train_file, line, row, class_index)
        except ValueError as error:
            parsed.errors.append(error)
            continue
        image_path = os.path.join(folder, image)  # an absolute path stays as it is
        parsed.first_line.setdefault(image_path, line)
        parsed.boxes_of_image.setdefault(image_path, []).extend([box] if box is not None else [])
    return drop_degenerate_boxes(parsed, folder) if drop_degenerate else parsed


def drop_degenerate_boxes(parsed: CSVAnnotations, folder: str) -> CSVAnnotations:
    """The rows of boxes without area moved from `errors` to `dropped`, and the images left without any box by it
    left out (kept, they would teach that their objects are background)."""
    dropped = [error for error in parsed.errors if isinstance(error, DegenerateBox)]
    for image_path in {os.path.join(folder, error.image) for error in dropped}:
        if not parsed.boxes_of_image.get(image_path):
            parsed.boxes_of_image.pop(image_path, None)
            parsed.first_line.pop(image_path, None)
    errors = [error for error in parsed.errors if not isinstance(error, DegenerateBox)]
    return CSVAnnotations(parsed.boxes_of_image, parsed.first_line, errors, dropped)


def dropped_report(train_file: str, dropped: list[DegenerateBox], shown: int = 3) -> str:
    """One line: how many boxes without area were left out of `train_file`, by kind, and the first few rows."""
    counts = ", ".join(f"{count} {kind}" for kind, count in Counter(error.kind for error in dropped).items())
    first = "; ".join(str(error) for error in dropped[:shown])
    return f"{train_file}: dropped {len(dropped)} box(es) without area ({counts}); first: {first}"


def read_csv_image_paths(train_file: str) -> list[str]:
    """The images of a CSV annotation file, each once, in order; only the path column is read (any classes)."""
    folder = os.path.dirname(os.path.abspath(train_file))
    rows = read_csv_rows(train_file, ANNOTATION_COLUMNS)
    return list(dict.fromkeys(os.path.join(folder, split_annotation_row(train_file, line, row)[0])
                              for line, row in rows))


# ------------------------------------------------------------------------------------------------ transforms


class Resize:
    """Resize so the shorter side is min_size unless the longer side would exceed max_size; then the longer side
    is max_size. min_size = (lo, hi) is scale jitter: the shorter side drawn uniformly from lo..hi for each image.
    Called on (image (3, H, W), boxes (N, 4)), returns (image, boxes, scale): boxes are multiplied by scale, the
    factor scale_for draws unless it is given."""

    def __init__(self, min_size: int | tuple[int, int], max_size: int):
        low, high = min_size if isinstance(min_size, Sequence) else (min_size, min_size)
        if not 0 < low <= high <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size (min_size a size or a (lo, hi) range), got "
                             f"min_size={min_size}, max_size={max_size}")
        self.min_size, self.max_size, self.size_range = min_size, max_size, (low, high)

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor for an image of this size (random if min_size is a range)."""
        low, high = self.size_range
        shorter_side = int(torch.randint(low, high + 1, ())) if low < high else low
        return min(shorter_side / min(height, width), self.max_size / max(height, width))

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor,
                 scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        scale = self.scale_for(*image.shape[-2:]) if scale is None else scale
        image = resize_image(image, scale)
        # Rounding the image size can cut up to half a pixel off the far edges; keep boxes inside the image.
        return image, clip_boxes(boxes * scale, *image.shape[-2:]), scale


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """A (3, H, W) image resized by `scale` to whole pixels, bilinear with antialiasing: (3, H', W')."""
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
        return image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class DetectionTransform:
    """One item's transforms: resize (if any), then flip (if any); data/augmentations.py adds the others around them.
    Called on (image (3, H, W) uint8, target), returns (image, target, scale), scale being the resize factor (1.0
    without a resize). A custom transform given to a dataset follows the same contract: a uint8 image, and a target
    whose labels and difficult flags follow their boxes; boxes may leave the image (the dataset clips them)."""

    def __init__(self, resize: Resize | None = None, flip: RandomHorizontalFlip | None = None):
        self.resize, self.flip = resize, flip

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target, float]:
        boxes, scale = target["boxes"], 1.0
        if self.resize is not None:
            image, boxes, scale = self.resize(image, boxes)
        if self.flip is not None:
            image, boxes = self.flip(image, boxes)
        return image, {**target, "boxes": boxes}, scale


def build_transform(train: bool, min_size: int, max_size: int, jitter: tuple[int, int] | None = None,
                    augmentation=None) -> Transform:
    """Training: resize (to min_size, or the jitter range), flip, and the augmentation around; else resize."""
    if not train:
        return DetectionTransform(Resize(min_size, max_size))
    transform = DetectionTransform(Resize(jitter or min_size, max_size), RandomHorizontalFlip(0.5))
    return augmentation.around(transform) if augmentation is not None else transform


# -------------------------------------------------------------------------------------------------- datasets


def clip_to_image(annotations: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) annotations clipped to a height x width image, and the (N,) mask of those with area left."""
    boxes = clip_boxes(annotations[:, :4], height, width)  # (N, 4)
    return torch.cat([boxes, annotations[:, 4:]], dim=1), has_area(boxes)  # (N, 4) + (N, 1) -> (N, 5)


def inside_image(image: torch.Tensor, target: Target, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A transform's output as an item's (N, 5) annotations and (N,) difficult flags, clipped to the image."""
    boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
    if image.dtype != torch.uint8 or boxes.shape != (len(labels), 4) or difficult.shape != labels.shape:
        raise ValueError(f"{path}: transform returned a {image.dtype} image, boxes of shape {tuple(boxes.shape)}, "
                         f"{len(labels)} labels and {len(difficult)} difficult flags; a transform must return a uint8 "
                         f"image and one label and one flag per box, in the order of the boxes")
    rows = torch.cat([boxes.float(), labels[:, None].float()], dim=1)  # (N, 4) + (N, 1) -> (N, 5)
    clipped, keep = clip_to_image(rows, *image.shape[1:])
    return clipped[keep], difficult[keep]


@contextlib.contextmanager
def seeded_random(seed: int | None) -> Iterator[None]:
    """Inside, torch's random numbers come from `seed` (if not None); outside, they continue as before."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of an item's random transforms in an epoch of a run: a function of the three alone."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def say_boxes_outside(image_paths: list[str], annotations: list[np.ndarray], image_sizes: list[tuple[int, int]]):
    """Say if some boxes reach past their image: items clip them to it (train.py --check_data lists them)."""
    outside = [path for path, boxes, (height, width) in zip(image_paths, annotations, image_sizes)
               if (boxes[:, :2] < 0).any() or (boxes[:, 2] > width).any() or (boxes[:, 3] > height).any()]
    if outside:
        print(f"{len(outside)} image(s) have boxes reaching past the image, such as {outside[0]}: they are clipped to "
              f"it, and left out where no area is left (train.py --check_data lists them)")


class DetectionDataset(Dataset):
    """Image files with their (N, 5) boxes x1, y1, x2, y2, class index in the files' pixels, (N,) difficult flags
    (none by default), class names and (height, width) image sizes (read from the files' headers unless given; past
    Pillow's pixel limit with allow_large).
    An item, of an index or of (index, seed) with its random transforms seeded, is the dict of the module
    docstring. data/coco.py and data/voc.py make one of their formats; CSVDataset of the CSV format."""

    use_07_metric = False  # the AP its benchmark reports: VOC2007's test set is scored with the 11-point AP

    def __init__(self, image_paths: list[str], annotations: list[np.ndarray], class_names: list[str],
                 transform: Transform | None = None, difficult: list[np.ndarray] | None = None,
                 image_sizes: list[tuple[int, int]] | None = None, allow_large: bool = False):
        self.image_paths, self.allow_large = image_paths, allow_large
        self.annotations = annotations
        self.difficult = difficult if difficult is not None else [np.zeros(len(boxes), bool) for boxes in annotations]
        self.class_names = class_names
        self.transform = transform if transform is not None else DetectionTransform()  # None: as the file is
        self.image_sizes = image_sizes or [read_image_size(path, allow_large) for path in image_paths]
        say_boxes_outside(image_paths, annotations, self.image_sizes)

    @property
    def num_classes(self) -> int:  # K
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_annotations(self, index: int) -> np.ndarray:
        """(N, 5) float32 rows x1, y1, x2, y2, class index, in pixels of the image file, as annotated."""
        return self.annotations[index].copy()

    def load_difficult(self, index: int) -> np.ndarray:
        """(N,) bool: which boxes of load_annotations(index) evaluation neither counts as hits nor as misses."""
        return self.difficult[index].copy()

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.image_paths[index]
        image = read_rgb_image(path, self.allow_large)  # (3, H, W) uint8
        height, width = image.shape[1:]
        annotations, keep = clip_to_image(torch.from_numpy(self.annotations[index]), height, width)  # (N, 5), (N,)
        target = {"boxes": annotations[keep, :4], "labels": annotations[keep, 4].long(),
                  "difficult": torch.from_numpy(self.difficult[index])[keep]}
        with seeded_random(seed):
            image, target, scale = self.transform(image, target)
        annotations, difficult = inside_image(image, target, path)
        return {"image": image, "annotations": annotations, "difficult": difficult, "scale": float(scale),
                "index": index, "original_size": (height, width)}


def raise_first(errors: Sequence[ValueError], what: str) -> None:
    """Raise the first error found reading annotations, saying how many more there are."""
    if errors:
        more = f" (and {len(errors) - 1} more {what}: train.py --check_data lists them all)" if len(errors) > 1 else ""
        raise ValueError(f"{errors[0]}{more}") from errors[0]


def raise_if_missing(source: str, paths: Sequence[str], where: Sequence[str]) -> None:
    """Fail when a dataset is made, not hours into training, if image files are missing; list the first few."""
    missing = [f"{place}: {path}" for path, place in zip(paths, where) if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(paths)} image files not found, e.g. "
                         + "; ".join(missing[:MAX_LISTED]))


class CSVDataset(DetectionDataset):
    """The images and boxes of a CSV annotation file (`path,x1,y1,x2,y2,class_name` rows; relative paths are
    relative to the file) with its class list (`class_name,id` rows). A malformed row raises ValueError naming the
    file and line; with `drop_degenerate`, boxes without area are left out, counted in a printed line, instead."""

    def __init__(self, train_file: str, class_list: str, transform: Transform | None = None,
                 drop_degenerate: bool = False, allow_large: bool = False):
        class_names = read_class_list(class_list)
        parsed = read_csv_annotations(train_file, class_names, drop_degenerate)
        raise_first(parsed.errors, "malformed row(s)")
        if parsed.dropped:
            print(dropped_report(train_file, parsed.dropped))
        image_paths = list(parsed.boxes_of_image)
        raise_if_missing(train_file, image_paths, [f"line {parsed.first_line[path]}" for path in image_paths])
        annotations = [np.array(boxes, dtype=np.float32).reshape(-1, 5) for boxes in parsed.boxes_of_image.values()]
        super().__init__(image_paths, annotations, class_names, transform, allow_large=allow_large)


class ImageFiles(Dataset):
    """Image files to detect on, each whole, resized by the model's rule: items as DetectionDataset's, without
    boxes. An image whose header cannot be read is left out, `unreadable` says why (path -> message); one whose
    pixels then cannot be decoded gives an item of original_size (0, 0), so that its batch goes on. With
    allow_large, images past Pillow's pixel limit are read."""

    def __init__(self, paths: Sequence[str], min_size: int, max_size: int, allow_large: bool = False):
        self.resize, self.allow_large = Resize(min_size, max_size), allow_large
        self.image_paths, self.image_sizes, self.unreadable = [], [], {}
        for path in paths:
            try:
                self.image_sizes.append(read_image_size(path, allow_large))
                self.image_paths.append(path)
            except ValueError as error:
                self.unreadable[path] = str(error)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = read_rgb_image(self.image_paths[index], self.allow_large)  # (3, H, W)
        except ValueError:  # said again by why_unread, in the main process
            image, scale, original_size = torch.zeros((3, 1, 1), dtype=torch.uint8), 1.0, (0, 0)
        else:
            original_size = tuple(image.shape[1:])
            image, _, scale = self.resize(image, torch.zeros((0, 4)))
        return {"image": image, "annotations": torch.zeros((0, 5)), "difficult": torch.zeros(0, dtype=torch.bool),
                "scale": scale, "index": index, "original_size": original_size}

    def why_unread(self, path: str) -> str:
        """Why an image has no detections: its header could not be read, or its pixels not decoded."""
        if path in self.unreadable:
            return self.unreadable[path]
        try:
            read_rgb_image(path, self.allow_large)
        except ValueError as error:
            return str(error)
        return f"{path}: could not be decoded while predicting, though it can now (was it being written?)"


# -------------------------------------------------------------------------------------------------- batching


def collate(batch: list[dict], size_divisible: int = 32) -> dict:
    """Items as a batch: uint8 images padded to a common size with the mean colour, annotations with rows of -1."""
    if not batch:
        raise ValueError("collate got an empty batch")
    # Multiples of 32: C3..C5 (strides 8, 16, 32) then tile the padded image exactly, so that each upsampled cell
    # of FPN's top-down path lies on the 2x2 lateral cells it is added to; P6 and P7 (strides 64, 128) round up.
    padded_height = math.ceil(max(item["image"].shape[1] for item in batch) / size_divisible) * size_divisible
    padded_width = math.ceil(max(item["image"].shape[2] for item in batch) / size_divisible) * size_divisible
    max_boxes = max(item["annotations"].shape[0] for item in batch)
    images = torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(1, 3, 1, 1).repeat(
        len(batch), 1, padded_height, padded_width)  # (B, 3, Hp, Wp)
    annotations = torch.full((len(batch), max_boxes, 5), PADDING_ROW)  # (B, Nmax, 5)
    difficult = torch.zeros(len(batch), max_boxes, dtype=torch.bool)  # (B, Nmax)
    for i, item in enumerate(batch):
        _, height, width = item["image"].shape
        images[i, :, :height, :width] = item["image"]  # (3, H, W) into the top-left of (3, Hp, Wp)
        annotations[i, : len(item["annotations"])] = item["annotations"]  # (N, 5) into the top of (Nmax, 5)
        difficult[i, : len(item["difficult"])] = item["difficult"]  # (N,) into the start of (Nmax,)
    return {"images": images, "annotations": annotations, "difficult": difficult,
            "scales": torch.tensor([item["scale"] for item in batch], dtype=torch.float32),  # (B,)
            "image_sizes": torch.tensor([item["image"].shape[1:] for item in batch]),  # (B, 2): each (H, W) unpadded
            "indices": [item["index"] for item in batch], "original_sizes": [item["original_size"] for item in batch]}


def orientation_batches(image_sizes: Sequence[tuple[int, int]], order: Sequence[int],
                        batch_size: int) -> list[list[int]]:
    """The indices in `order` in batches of one orientation, as detectron2's aspect ratio grouping."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    buckets: tuple[list[int], list[int]] = ([], [])  # portrait, landscape
    batches = []
    for index in order:
        height, width = image_sizes[index]
        bucket = buckets[width >= height]
        bucket.append(index)
        if len(bucket) == batch_size:
            batches.append(bucket.copy())
            bucket.clear()
    return batches + [bucket for bucket in buckets if bucket]


class TrainingSampler(Sampler[list[tuple[int, int]]]):
    """train.py's batches: of one orientation (orientation_batches), shuffled from seed + epoch, each item with the
    seed of its random transforms (item_seed). With world_size > 1, process `rank` takes every world_size-th batch of
    the same list, padded by repeating its start (as DistributedSampler repeats indices) so that every process steps
    as often. Call set_epoch(epoch, start) at the start of every epoch; `start` skips the batches of this process a
    resumed run has trained on."""

    def __init__(self, image_sizes: Sequence[tuple[int, int]], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not image_sizes or not 0 <= rank < world_size:
            raise ValueError(f"need at least one image and 0 <= rank < world_size, got {len(image_sizes)} images, "
                             f"rank {rank} of {world_size}")
        self.image_sizes, self.batch_size, self.seed = list(image_sizes), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(len(self.image_sizes), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batches = orientation_batches(self.image_sizes, order.tolist(), self.batch_size)
        shares = list(itertools.islice(itertools.cycle(batches), len(self) * self.world_size))[self.rank::self.world_size]
        for batch in shares[self.start:]:
            yield [(index, item_seed(self.seed, self.epoch, index)) for index in batch]

    def __len__(self) -> int:  # the batches this process takes an epoch
        landscape = sum(width >= height for height, width in self.image_sizes)
        batches = math.ceil(landscape / self.batch_size) + math.ceil((len(self.image_sizes) - landscape) / self.batch_size)
        return math.ceil(batches / self.world_size)


def training_loader(dataset: DetectionDataset, batch_size: int, workers: int = 0, seed: int = 0, rank: int = 0,
                    world_size: int = 1, pin_memory: bool = False) -> tuple[TrainingSampler, DataLoader]:
    """The sampler and loader of train.py's batches, `workers` loading processes persisting across epochs."""
    sampler = TrainingSampler(dataset.image_sizes, batch_size, seed, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0)
    return sampler, loader


def inference_loader(dataset: Dataset, batch_size: int = 8, workers: int = 0, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """Items (with image_sizes) in batches of one orientation, in order; or process `rank`'s share."""
    batches = orientation_batches(dataset.image_sizes, range(len(dataset)), batch_size)[rank::world_size]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers, pin_memory=pin_memory)
