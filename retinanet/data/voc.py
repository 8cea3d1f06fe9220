"""Pascal VOC annotations, read and checked into a DetectionDataset: the XML files of the VOC benchmark (and of
LabelImg and CVAT's VOC export), each problem a ValueError naming the file and the line. The data check
(diagnostics/check.py) reads them too.

Two layouts. A VOC root (e.g. VOCdevkit/VOC2007) holds Annotations/{id}.xml, JPEGImages/ and ImageSets/Main/{set}.txt
listing the ids of each set; without ImageSets/Main/, every file in Annotations/ is read. Any other folder holds XML
files next to their images (LabelImg's layout) and is one set, whatever its name. An image is the file the XML's
<filename> names, or {id}.jpg (VOC's rule) or {id} with another image extension.

VOC's coordinates are 1-based pixel indices, both ends included: xmin = 1, xmax = 3 is a box over the first three
pixels, x1 = 0 and x2 = 3 in the continuous pixel coordinates used here (x1 = xmin - 1, y1 = ymin - 1, as
detectron2 reads them). A `difficult` object is a box like any other for training, as in detectron2; evaluation
neither counts it as a hit nor as a miss (the VOC protocol, evaluation.py).

Legend for shapes: N boxes of one image.
"""

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from typing import NamedTuple
from xml.parsers import expat

import numpy as np

from ..dataloader import (IMAGE_EXTENSIONS, DetectionDataset, Transform, line_error, raise_first, raise_if_missing,
                          read_class_list, require_file)

# The 20 classes of VOC2007 and VOC2012, in the order of the development kit (and of every released VOC model).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


class VOCObject(NamedTuple):
    """One <object> of an XML file."""

    name: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in continuous pixel coordinates (see above)
    difficult: bool
    line: int  # where its <object> starts


class VOCFile(NamedTuple):
    """One XML file and what it says about its image."""

    xml_path: str
    image_path: str
    size: tuple[int, int] | None  # (height, width) as <size> states, None if it states none
    objects: list[VOCObject]


class ParsedVOC(NamedTuple):
    """The files of a set, in set order, and one error per XML file or object that could not be read."""

    files: list[VOCFile]
    errors: list[ValueError]


class VOCSet(NamedTuple):
    """A set of one or more roots: train.py trains on VOC2007 and VOC2012 trainval as one set."""

    roots: tuple[str, ...]
    name: str


# ---------------------------------------------------------------------------------------------- XML files


def parse_xml(path: str) -> tuple[ET.Element, dict[ET.Element, int]]:
    """The element tree of an XML file and the line each element starts on; a malformed file is a ValueError
    naming the file and the line."""
    require_file(path, "VOC annotation file")
    builder, parser, lines = ET.TreeBuilder(), expat.ParserCreate(), {}

    def start(tag: str, attributes: dict[str, str]) -> None:
        lines[builder.start(tag, attributes)] = parser.CurrentLineNumber

    parser.StartElementHandler, parser.EndElementHandler = start, builder.end
    parser.CharacterDataHandler, parser.buffer_text = builder.data, True
    with open(path, "rb") as file:
        try:
            parser.ParseFile(file)
        except expat.ExpatError as error:
            raise line_error(path, error.lineno, f"malformed XML ({expat.ErrorString(error.code)})") from error
    return builder.close(), lines


def _coordinate(path: str, line: int, tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise line_error(path, line, f"<{tag}> {text.strip()!r} is not a number") from error
    if not np.isfinite(value):
        raise line_error(path, line, f"<{tag}> is {text.strip()!r}; expected a finite number (pixels)")
    return value


def read_object(element: ET.Element, line: int, path: str) -> VOCObject:
    """One <object>: its <name>, <bndbox> and <difficult> (0 if absent)."""
    name = (element.findtext("name") or "").strip()
    if not name:
        raise line_error(path, line, "<object> without a <name>")
    bndbox = element.find("bndbox")
    texts = [bndbox.findtext(tag) if bndbox is not None else None for tag in BOX_TAGS]
    if None in texts:
        raise line_error(path, line, f"<object> {name!r} has no <bndbox> with <xmin>, <ymin>, <xmax> and <ymax>")
    xmin, ymin, xmax, ymax = (_coordinate(path, line, tag, text) for tag, text in zip(BOX_TAGS, texts))
    if xmax < xmin or ymax < ymin:
        raise line_error(path, line, f"empty box of {name!r} (xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax "
                     f"{ymax:g}); expected xmax >= xmin and ymax >= ymin")
    difficult = (element.findtext("difficult") or "0").strip()
    if difficult not in ("0", "1"):
        raise line_error(path, line, f"<difficult> of {name!r} is {difficult!r}; expected 0 or 1")
    return VOCObject(name, (xmin - 1, ymin - 1, xmax, ymax), difficult == "1", line)


def _stated_size(root: ET.Element) -> tuple[int, int] | None:
    """(height, width) from <size>; None if absent or not positive integers (some tools write 0 for unknown)."""
    texts = [(root.findtext(f"size/{tag}") or "").strip() for tag in ("height", "width")]
    if not all(text.isdigit() and int(text) > 0 for text in texts):
        return None
    return int(texts[0]), int(texts[1])


def find_image(folder: str, filename: str, stem: str) -> str:
    """The image of an XML file: <filename> in `folder`, else {stem} with the first image extension found there;
    the first candidate if there is none (the missing file is then reported)."""
    names = ([filename] if filename else []) + [stem + extension for extension in IMAGE_EXTENSIONS]
    candidates = [os.path.join(folder, name) for name in names]
    return next((path for path in candidates if os.path.isfile(path)), candidates[0])


def read_voc_file(path: str, image_folder: str, errors: list[ValueError]) -> VOCFile:
    """One XML file. An object that cannot be read is appended to `errors` and left out; a file that cannot be
    read at all raises ValueError naming the file and the line."""
    root, lines = parse_xml(path)
    if root.tag != "annotation":
        raise line_error(path, lines[root], f"the root element is <{root.tag}>; expected <annotation>")
    objects = []
    for element in root.findall("object"):
        try:
            objects.append(read_object(element, lines[element], path))
        except ValueError as error:
            errors.append(error)
    stem = os.path.splitext(os.path.basename(path))[0]
    image_path = find_image(image_folder, (root.findtext("filename") or "").strip(), stem)
    return VOCFile(path, image_path, _stated_size(root), objects)


# ---------------------------------------------------------------------------------------------------- sets


def set_file(root: str, set_name: str) -> str:
    """Where a VOC root lists the ids of a set."""
    return os.path.join(root, "ImageSets", "Main", f"{set_name}.txt")


def _xml_files_in(folder: str) -> list[str]:
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(".xml"))
    if not names:
        raise ValueError(f"{folder}: no XML files in this folder; expected a VOC root (Annotations/, JPEGImages/, "
                         f"ImageSets/Main/) or a folder of VOC XML files next to their images")
    return [os.path.join(folder, name) for name in names]


def set_xml_files(root: str, set_name: str) -> tuple[list[str], str]:
    """The XML files of set `set_name` of `root` (see the module docstring) and the folder of their images."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: no such folder; expected a VOC root (e.g. VOCdevkit/VOC2007) or a folder of XML "
                         f"files")
    annotations, images = os.path.join(root, "Annotations"), os.path.join(root, "JPEGImages")
    if not os.path.isdir(annotations):
        return _xml_files_in(root), root
    if not os.path.isdir(os.path.dirname(set_file(root, set_name))):
        return _xml_files_in(annotations), images
    listing = set_file(root, set_name)
    require_file(listing, f"list of the set {set_name!r}")
    with open(listing, encoding="utf-8") as file:
        ids = [line.split()[0] for line in file if line.strip()]
    if not ids:
        raise ValueError(f"{listing}: lists no image ids")
    return [os.path.join(annotations, f"{image_id}.xml") for image_id in ids], images


def read_voc_set(voc_set: VOCSet) -> ParsedVOC:
    """Every XML file of the set, over its roots; problems are collected in `errors` so that a data check can list
    them all. A root without the set raises ValueError."""
    parsed = ParsedVOC([], [])
    for root in voc_set.roots:
        paths, image_folder = set_xml_files(root, voc_set.name)
        for path in paths:
            try:
                parsed.files.append(read_voc_file(path, image_folder, parsed.errors))
            except ValueError as error:
                parsed.errors.append(error)
    return parsed


def training_sets(paths: Sequence[str], train_set: str, val_set: str,
                  val_paths: Sequence[str] | None = None) -> tuple[VOCSet, VOCSet | None]:
    """The sets a training run reads: `train_set` of every path; `val_set` of val_paths if given, else of the VOC
    roots among `paths` that list it (VOC2012 has no public test set: on VOC2007 + VOC2012, VOC2007's test set),
    None if none does (a folder of XML files is a training set only)."""
    val_roots = val_paths or [path for path in paths if os.path.isfile(set_file(path, val_set))]
    return VOCSet(tuple(paths), train_set), (VOCSet(tuple(val_roots), val_set) if val_roots else None)


def is_voc2007_test(voc_set: VOCSet) -> bool:
    """Whether the set is VOC2007's test set, which the VOC2007 protocol scores with the 11-point AP."""
    return voc_set.name == "test" and all(os.path.basename(os.path.normpath(root)) == "VOC2007"
                                          for root in voc_set.roots)


# ------------------------------------------------------------------------------------------------- classes


def found_class_names(files: list[VOCFile]) -> list[str]:
    """VOC's 20 classes, in their order, if every name found is one of them; otherwise the sorted names found."""
    names = {obj.name for file in files for obj in file.objects}
    return list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)


def run_class_names(class_list: str | None, parsed_sets: Iterable[ParsedVOC]) -> list[str]:
    """The classes of a run on these sets (its training and validation sets, as read_voc_set returns them): those
    of the class list file (the CSV format's) if given, else found_class_names over all their files."""
    if class_list:
        return read_class_list(class_list)
    return found_class_names([file for parsed in parsed_sets for file in parsed.files])


class VOCBoxes(NamedTuple):
    """The boxes of each file as arrays, the objects of unknown classes left out and listed in `errors`."""

    annotations: list[np.ndarray]  # per file (N, 5) x1, y1, x2, y2, class index
    difficult: list[np.ndarray]  # per file (N,) bool
    lines: list[list[int]]  # per file, the line of each box's <object>
    errors: list[ValueError]


def boxes_of_files(files: list[VOCFile], class_names: list[str]) -> VOCBoxes:
    """The boxes of each file with their class index in `class_names`."""
    class_index = {name: index for index, name in enumerate(class_names)}
    boxes = VOCBoxes([], [], [], [])
    for file in files:
        known = [obj for obj in file.objects if obj.name in class_index]
        boxes.errors.extend(line_error(file.xml_path, obj.line, f"unknown class {obj.name!r}; the class list has "
                                   f"{class_names[:20]}") for obj in file.objects if obj.name not in class_index)
        rows = [[*obj.box, class_index[obj.name]] for obj in known]
        boxes.annotations.append(np.array(rows, dtype=np.float32).reshape(-1, 5))
        boxes.difficult.append(np.array([obj.difficult for obj in known], dtype=bool))
        boxes.lines.append([obj.line for obj in known])
    return boxes


# ------------------------------------------------------------------------------------------------ datasets


class VOCDataset(DetectionDataset):
    """Boxes from the Pascal VOC XML files of set `set_name` of one or more roots: VOC roots (e.g.
    VOCdevkit/VOC2007, VOCdevkit/VOC2012) or folders of XML files next to their images (voc.py). Classes:
    `class_names` if given, else VOC's 20 when every name found is one of them, else the sorted names found
    (train.py gives those of its training and validation sets: run_class_names).
    Difficult boxes train as any other; evaluation neither counts them as hits nor as misses, with the 11-point AP
    on VOC2007's test set. Malformed files and objects, unknown classes and missing images raise ValueError naming
    the file and the line. `parsed` is the set as read_voc_set returns it, where the caller has read it already."""

    def __init__(self, roots: Sequence[str], set_name: str, class_names: list[str] | None = None,
                 transform: Transform | None = None, parsed: ParsedVOC | None = None, allow_large: bool = False):
        voc_set = VOCSet(tuple(roots), set_name)
        parsed = read_voc_set(voc_set) if parsed is None else parsed
        class_names = list(class_names) if class_names is not None else found_class_names(parsed.files)
        boxes = boxes_of_files(parsed.files, class_names)
        raise_first(parsed.errors + boxes.errors, "problem(s)")
        image_paths = [file.image_path for file in parsed.files]
        raise_if_missing(f"VOC set {set_name!r}", image_paths, [file.xml_path for file in parsed.files])
        super().__init__(image_paths, boxes.annotations, class_names, transform, boxes.difficult,
                         allow_large=allow_large)
        self.use_07_metric = is_voc2007_test(voc_set)


def voc_datasets(paths: Sequence[str], train_set: str, val_set: str, val_paths: Sequence[str] | None = None,
                 class_list: str | None = None) -> tuple[VOCDataset, VOCDataset | None]:
    """A training run's datasets (training_sets), each set read once, with the classes of class_list or those
    found in both (run_class_names)."""
    train_voc, val_voc = training_sets(paths, train_set, val_set, val_paths)
    parsed = {voc_set: read_voc_set(voc_set) for voc_set in (train_voc, val_voc) if voc_set is not None}
    class_names = run_class_names(class_list, parsed.values())
    return (VOCDataset(train_voc.roots, train_voc.name, class_names, parsed=parsed[train_voc]),
            VOCDataset(val_voc.roots, val_voc.name, class_names, parsed=parsed[val_voc]) if val_voc else None)
