"""The datasets of annotated image files: CSV (yhenon/pytorch-retinanet's format), COCO and Pascal VOC, each a
retinanet.dataloader.DetectionDataset whose items follow its contract. Malformed files raise ValueError naming the
file and the line or entry; missing image files are found when the dataset is made, not hours into training.
"""

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..dataloader import DetectionDataset
from ..transforms import Transform
from .annotations import MAX_LISTED, dropped_report, load_coco, read_class_list, read_csv_annotations
from .images import read_image_size, read_rgb_image
from .voc import ParsedVOC, VOCSet, boxes_of_files, found_class_names, is_voc2007_test, read_voc_set


def _raise_if_missing(source: str, paths: Sequence[str], where: Sequence[str]) -> None:
    """Fail at construction, not hours into training, if image files are missing; list the first few."""
    missing = [f"{place}: {path}" for path, place in zip(paths, where) if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(paths)} image files not found, e.g. " + "; ".join(missing[:MAX_LISTED])
        )


def _raise_first(errors: Sequence[ValueError], what: str) -> None:
    """Raise the first of the errors found reading annotations, saying how many more there are."""
    if errors:
        more = len(errors) - 1
        hint = f" (and {more} more {what}: train.py --check_data lists them all)" if more else ""
        raise ValueError(f"{errors[0]}{hint}") from errors[0]


class ImageFileDataset(DetectionDataset):
    """A DetectionDataset of image files (paths) with their (N, 5) annotations, as the annotation formats below give
    them, or as a caller has them."""

    def read_image(self, index: int) -> torch.Tensor:
        """The image file of item `index` decoded: (3, H, W) uint8 RGB (images.py)."""
        return read_rgb_image(self.image_paths[index])

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image file, read from its header."""
        return read_image_size(self.image_paths[index])


class CSVDataset(ImageFileDataset):
    """Boxes from a CSV file in yhenon/pytorch-retinanet's format.

    train_file rows: `path,x1,y1,x2,y2,class_name`, several rows per image, `path,,,,,` for an image without
    objects; relative paths are relative to the CSV file's folder. class_list rows: `class_name,id`, ids 0..K-1.
    Neither file has a header. Malformed rows raise ValueError naming the file and line; with `drop_degenerate`,
    boxes without area (x2 <= x1 or y2 <= y1) are left out with a warning that counts them instead.
    """

    def __init__(self, train_file: str, class_list: str, transform: Transform | None = None,
                 drop_degenerate: bool = False):
        class_names = read_class_list(class_list)
        parsed = read_csv_annotations(train_file, class_names, drop_degenerate)
        _raise_first(parsed.errors, "malformed row(s)")
        if parsed.dropped:
            warnings.warn(dropped_report(train_file, parsed.dropped), stacklevel=2)
        image_paths = list(parsed.boxes_of_image)
        _raise_if_missing(train_file, image_paths, [f"line {parsed.first_line[path]}" for path in image_paths])
        annotations = [np.array(boxes, dtype=np.float32).reshape(-1, 5) for boxes in parsed.boxes_of_image.values()]
        super().__init__(image_paths, annotations, class_names, transform)


class CocoDataset(ImageFileDataset):
    """Boxes from `{root}/annotations/instances_{set_name}.json`, images from `{root}/images/{set_name}/` or
    `{root}/{set_name}/`. COCO category ids (sorted) map to class indices 0..K-1 and back. Crowd boxes are
    skipped, zero-area boxes dropped with a warning, images without boxes kept as negatives. Missing image files
    raise ValueError unless check_files is False (diagnostics/check.py then reports each one)."""

    def __init__(self, root: str, set_name: str, transform: Transform | None = None, check_files: bool = True):
        annotation_file = os.path.join(root, "annotations", f"instances_{set_name}.json")
        self.annotation_file = annotation_file  # problems found later (diagnostics/check.py) name it
        self.coco = load_coco(annotation_file)
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

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the COCO json."""
        image_info = self.coco.imgs[self.image_ids[index]]
        return image_info["height"], image_info["width"]


class VOCDataset(ImageFileDataset):
    """Boxes from the Pascal VOC XML files of set `set_name` of one or more roots: VOC roots (e.g.
    VOCdevkit/VOC2007, VOCdevkit/VOC2012) or folders of XML files next to their images (voc.py). Classes:
    `class_names` if given, else VOC's 20 when every name found is one of them, else the sorted names found
    (train.py gives those of its training and validation sets: voc.run_class_names).
    Difficult boxes train as any other; evaluation neither counts them as hits nor as misses, with the 11-point AP
    on VOC2007's test set. Malformed files and objects, unknown classes and missing images raise ValueError naming
    the file and the line. `parsed` is the set as read_voc_set returns it, where the caller has read it already."""

    def __init__(self, roots: Sequence[str], set_name: str, class_names: list[str] | None = None,
                 transform: Transform | None = None, parsed: ParsedVOC | None = None):
        voc_set = VOCSet(tuple(roots), set_name)
        parsed = read_voc_set(voc_set) if parsed is None else parsed
        class_names = list(class_names) if class_names is not None else found_class_names(parsed.files)
        boxes = boxes_of_files(parsed.files, class_names)
        _raise_first(parsed.errors + boxes.errors, "problem(s)")
        image_paths = [file.image_path for file in parsed.files]
        _raise_if_missing(f"VOC set {set_name!r}", image_paths, [file.xml_path for file in parsed.files])
        super().__init__(image_paths, boxes.annotations, class_names, transform, boxes.difficult)
        self.use_07_metric = is_voc2007_test(voc_set)
