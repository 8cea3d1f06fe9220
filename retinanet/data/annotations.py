"""Annotation files, read and checked: the CSV class list and box rows (yhenon/pytorch-retinanet's format) and COCO
instances files, each problem a ValueError naming the file and the line or entry. The datasets (data/datasets.py)
and the data check (diagnostics/check.py) share them.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
from collections import Counter
from typing import NamedTuple

from pycocotools.coco import COCO

from .images import require_file

ANNOTATION_COLUMNS = "path,x1,y1,x2,y2,class_name"
CLASS_COLUMNS = "class_name,id"
MAX_LISTED = 5  # how many missing files or ids an error message lists


# ------------------------------------------------------------------------------------------------------- CSV


def line_error(path: str, line: int, problem: str) -> ValueError:
    """A user's error in an annotation file (CSV or XML), naming the file and the line."""
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
    """Class names from rows `class_name,id`, the ids 0..K-1 each once. Returns the names, index = id."""
    id_of_name: dict[str, int] = {}
    line_of_id: dict[int, int] = {}
    for line, row in _read_csv_rows(path, CLASS_COLUMNS):
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
        id_of_name[name] = class_id
        line_of_id[class_id] = line
    num_classes = len(id_of_name)
    for class_id, line in line_of_id.items():
        if not 0 <= class_id < num_classes:
            missing = sorted(set(range(num_classes)) - set(line_of_id))[:MAX_LISTED]
            raise line_error(
                path, line, f"class id {class_id} out of range: the {num_classes} ids must be 0..{num_classes - 1}, "
                f"each once (missing: {missing})"
            )
    return sorted(id_of_name, key=id_of_name.get)


def _split_annotation_row(path: str, line: int, row: list[str]) -> tuple[str, list[str]]:
    """One row `path,x1,y1,x2,y2,class_name` -> (image path, its 5 other fields), if it has 6 columns and a path."""
    if len(row) != 6:
        raise line_error(path, line, f"{len(row)} columns, expected 6: {ANNOTATION_COLUMNS}")
    image, *fields = row
    if not image:
        raise line_error(path, line, f"empty image path; expected {ANNOTATION_COLUMNS}")
    return image, fields


class DegenerateBox(ValueError):
    """A CSV row whose box has no area: `kind` says how ("zero width or height", or "corners swapped")."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _parse_annotation_row(
    path: str, line: int, row: list[str], class_index: dict[str, int]
) -> tuple[str, list[float] | None]:
    """One row `path,x1,y1,x2,y2,class_name` -> (image path, [x1, y1, x2, y2, class index]); the box is None
    for `path,,,,,`, an image without objects."""
    image, fields = _split_annotation_row(path, line, row)
    if not any(fields):
        return image, None
    if not all(fields):
        raise line_error(path, line, "some fields are empty: fill x1,y1,x2,y2,class_name, or leave all five empty "
                         "for an image without objects")
    coordinates = []
    for column, text in zip(("x1", "y1", "x2", "y2"), fields):
        try:
            value = float(text)
        except ValueError as error:
            raise line_error(path, line, f"{column} {text!r} is not a number{_no_header_hint(line)}") from error
        if not math.isfinite(value) or value < 0:
            raise line_error(path, line, f"{column} is {text!r}; expected a finite number >= 0 (pixels)")
        coordinates.append(value)
    x1, y1, x2, y2 = coordinates
    if x2 <= x1 or y2 <= y1:
        kind = "corners swapped (x2 < x1 or y2 < y1)" if x2 < x1 or y2 < y1 else "zero width or height"
        message = f"empty box ({x1}, {y1}, {x2}, {y2}); expected x2 > x1 and y2 > y1"
        raise DegenerateBox(str(line_error(path, line, message)), kind)
    name = fields[4]
    if name not in class_index:
        raise line_error(path, line, f"unknown class {name!r}; the class list has {list(class_index)[:20]}")
    return image, [x1, y1, x2, y2, float(class_index[name])]


class CSVAnnotations(NamedTuple):
    """The rows of a CSV annotation file, grouped by image in the order images first appear."""

    boxes_of_image: dict[str, list[list[float]]]  # absolute image path -> rows x1, y1, x2, y2, class index
    first_line: dict[str, int]  # image path -> the line it first appears on
    errors: list[ValueError]  # one per malformed row, each naming the file and the line
    dropped: list[DegenerateBox]  # with drop_degenerate: the rows of boxes without area, left out


def read_csv_annotations(train_file: str, class_names: list[str], drop_degenerate: bool = False) -> CSVAnnotations:
    """Parse every row of `train_file`. A malformed row is recorded in `errors` rather than raised, so that a
    data check can list every problem at once; relative image paths are resolved against the file's folder. With
    `drop_degenerate`, a box without area is not an error: its row goes to `dropped`, and an image all of whose
    boxes were dropped is left out (kept, it would teach that its objects are background)."""
    class_index = {name: index for index, name in enumerate(class_names)}
    parsed = CSVAnnotations({}, {}, [], [])
    emptied = set()  # with drop_degenerate: the images that had a box dropped
    folder = os.path.dirname(os.path.abspath(train_file))
    for line, row in _read_csv_rows(train_file, ANNOTATION_COLUMNS):
        try:
            image, box = _parse_annotation_row(train_file, line, row, class_index)
        except DegenerateBox as error:
            if not drop_degenerate:
                parsed.errors.append(error)
                continue
            parsed.dropped.append(error)
            emptied.add(os.path.join(folder, row[0]))
            continue
        except ValueError as error:
            parsed.errors.append(error)
            continue
        image_path = os.path.join(folder, image)  # an absolute path stays as it is
        parsed.first_line.setdefault(image_path, line)
        parsed.boxes_of_image.setdefault(image_path, [])
        if box is not None:
            parsed.boxes_of_image[image_path].append(box)
    for image_path in emptied:
        if not parsed.boxes_of_image.get(image_path):
            parsed.boxes_of_image.pop(image_path, None)
            parsed.first_line.pop(image_path, None)
    return parsed


def dropped_report(train_file: str, dropped: list[DegenerateBox], shown: int = 3) -> str:
    """One line: how many boxes without area were left out of `train_file`, by kind, and the first few rows."""
    counts = ", ".join(f"{count} {kind}" for kind, count in Counter(e.kind for e in dropped).items())
    first = "; ".join(str(error) for error in dropped[:shown])
    return f"{train_file}: dropped {len(dropped)} box(es) without area ({counts}); first: {first}"


def read_csv_image_paths(train_file: str) -> list[str]:
    """The images of a CSV annotation file, each once, in the order they first appear, their paths resolved as
    read_csv_annotations resolves them. Only the path column is read: the file may be annotated with any classes.
    A row without 6 columns or without a path raises ValueError naming the file and line."""
    folder = os.path.dirname(os.path.abspath(train_file))
    rows = _read_csv_rows(train_file, ANNOTATION_COLUMNS)
    image_paths = [os.path.join(folder, _split_annotation_row(train_file, line, row)[0]) for line, row in rows]
    return list(dict.fromkeys(image_paths))


# ------------------------------------------------------------------------------------------------------ COCO

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


def load_coco(annotation_file: str) -> COCO:
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
