"""Check a dataset before training: parse every annotation and decode every image, and list every problem with
its file and line or image, so that a user learns about row 80,412 before the first epoch, not hours into it.

    python train.py --dataset csv --csv_train train.csv --csv_classes classes.csv --check_data
    python train.py --dataset voc --voc_path VOCdevkit/VOC2007 --check_data

Errors stop training (a malformed row or XML file, an object without a box, an unknown class, a missing or
undecodable image); warnings do not (a box reaching past the image is clipped, one entirely outside it dropped, as
the datasets do while training). Then, if training can start, how the anchors cover the training boxes at the
training image size (§4 "Anchors", coverage.py), and with --fit_anchors the anchors fitted to them
(anchor_fit.py).
"""

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..data.coco import CocoDataset
from ..data.voc import ParsedVOC, VOCSet, boxes_of_files, read_voc_set, run_class_names, training_sets
from ..dataloader import DetectionDataset, clip_to_image, read_class_list, read_csv_annotations, read_rgb_image
from ..settings import ModelSettings
from .anchor_fit import fit_report
from .coverage import anchor_coverage, coverage_report


class Problem(NamedTuple):
    message: str  # names the file, and the line or the image
    fatal: bool  # True: training cannot start; False: a warning


class ImageToCheck(NamedTuple):
    path: str
    annotations: np.ndarray  # (N, 5) x1, y1, x2, y2, class index in the image's pixels
    where: str  # where the image is listed, e.g. "train.csv, line 12"
    expected_size: tuple[int, int] | None = None  # (height, width) the annotation file states, if any
    box_lines: tuple[int, ...] = ()  # the line of each box in the annotation file, if it has one per box


def check_image(image: ImageToCheck) -> list[Problem]:
    """Decode the image in full (a truncated file fails only then) and compare its boxes with its size."""
    try:
        height, width = read_rgb_image(image.path).shape[1:]
    except ValueError as error:
        return [Problem(f"{image.where}: {error}", fatal=True)]
    problems = []
    if image.expected_size is not None and image.expected_size != (height, width):
        problems.append(Problem(f"{image.where}: {image.path} is {width}x{height} pixels, the annotations say "
                                f"{image.expected_size[1]}x{image.expected_size[0]}", fatal=False))
    clipped, keep = clip_to_image(torch.from_numpy(image.annotations), height, width)
    is_clipped = (clipped.numpy() != image.annotations).any(axis=1)  # (N,)
    if is_clipped.any():
        lines = [line for line, clipped_box in zip(image.box_lines, is_clipped) if clipped_box]
        where = f"{image.where}, line{'s' * (len(lines) > 1)} {', '.join(map(str, lines))}" if lines else image.where
        problems.append(Problem(f"{where}: {image.path}: {int(is_clipped.sum())} box(es) reach past the "
                                f"{width}x{height} image: clipped, {int((~keep).sum())} of them dropped (no area "
                                f"left)", fatal=False))
    return problems


def check_images(images: list[ImageToCheck], workers: int = 4) -> list[Problem]:
    """check_image for every image, `workers` at a time (decoding releases the GIL), with a progress bar."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = tqdm(pool.map(check_image, images), total=len(images), desc="checking images", unit="image")
        return [problem for image_problems in results for problem in image_problems]


def check_csv(train_file: str, class_list: str, workers: int = 4) -> list[Problem]:
    """Every problem of a CSV dataset: the class list (its first error stops the check), each malformed row,
    each missing or undecodable image, each box that reaches past its image."""
    try:
        class_names = read_class_list(class_list)
    except ValueError as error:
        return [Problem(str(error), fatal=True)]
    parsed = read_csv_annotations(train_file, class_names)
    problems = [Problem(str(error), fatal=True) for error in parsed.errors]
    images = [
        ImageToCheck(path, np.array(boxes, dtype=np.float32).reshape(-1, 5), f"{train_file}, line {line}")
        for (path, boxes), line in zip(parsed.boxes_of_image.items(), parsed.first_line.values())
    ]
    return problems + check_images(images, workers)


def check_coco(root: str, set_name: str, workers: int = 4) -> list[Problem]:
    """Every problem of a COCO set: the annotation file's structure (its first error stops the check), then each
    missing or undecodable image, size different from the JSON's, box reaching past its image."""
    try:
        dataset = CocoDataset(root, set_name, check_files=False)
    except ValueError as error:
        return [Problem(str(error), fatal=True)]
    images = []
    for index, image_id in enumerate(dataset.image_ids):
        info = dataset.coco.imgs[image_id]
        where = f"{dataset.annotation_file}, image id {image_id}"
        images.append(ImageToCheck(dataset.image_paths[index], dataset.load_annotations(index), where,
                                   (info["height"], info["width"])))
    return check_images(images, workers)


def check_voc(voc_set: VOCSet, class_names: list[str], workers: int = 4, parsed: ParsedVOC | None = None
              ) -> list[Problem]:
    """Every problem of a VOC set: a missing set (it stops the check), each malformed XML file, object without a
    name or a box, object of a class not in class_names, missing or undecodable image, box reaching past its
    image, image of another size than its <size>. `parsed` is the set as read_voc_set returns it, if read already."""
    try:
        parsed = read_voc_set(voc_set) if parsed is None else parsed
    except ValueError as error:
        return [Problem(str(error), fatal=True)]
    boxes = boxes_of_files(parsed.files, class_names)
    problems = [Problem(str(error), fatal=True) for error in parsed.errors + boxes.errors]
    images = [ImageToCheck(file.image_path, annotations, file.xml_path, file.size, tuple(lines))
              for file, annotations, lines in zip(parsed.files, boxes.annotations, boxes.lines)]
    return problems + check_images(images, workers)


def report(problems: list[Problem], what: str) -> bool:
    """Print every problem and a summary line; True if training can start (no errors)."""
    for problem in problems:
        print(f"{'error' if problem.fatal else 'warning'}: {problem.message}")
    errors = sum(problem.fatal for problem in problems)
    print(f"{what}: {errors} error(s), {len(problems) - errors} warning(s)")
    return errors == 0


def check_data(coco: tuple[str, list[str]] | None = None, csv_files: list[str] = (), class_list: str | None = None,
               workers: int = 4, voc: tuple[VOCSet, VOCSet | None] | None = None) -> bool:
    """Every problem of the sets a run would read: COCO sets (root, set names), VOC training and validation sets
    (with the class list, if any) or CSV files with their class list. Prints them, with a summary line per set;
    True if training can start."""
    if coco is not None:
        root, set_names = coco
        return all([report(check_coco(root, name, workers), f"COCO set {name}") for name in set_names])
    if voc is not None:
        voc_sets = [voc_set for voc_set in voc if voc_set is not None]
        try:  # without a class list, the classes are those found in the sets: each set read once, for both
            parsed = {} if class_list else {voc_set: read_voc_set(voc_set) for voc_set in voc_sets}
            class_names = run_class_names(class_list, parsed.values())
        except ValueError as error:
            return report([Problem(str(error), fatal=True)], "VOC classes")
        return all([report(check_voc(voc_set, class_names, workers, parsed.get(voc_set)), f"VOC set {voc_set.name} "
                           f"of {', '.join(voc_set.roots)}") for voc_set in voc_sets])
    return all([report(check_csv(path, class_list, workers), path) for path in csv_files])


def check_files(dataset: str, csv_files: list[str | None], class_list: str | None, coco_path: str | None,
                voc_paths: list[str] | None, voc_val: list[str] | None, set_names: tuple[str, str],
                workers: int = 4) -> bool:
    """check_data for the sets a training run reads: of `dataset` "coco", its training and validation `set_names`;
    of "voc", those sets of the roots (voc.training_sets); otherwise the CSV files given. True if training can
    start."""
    if dataset == "coco":
        return check_data(coco=(coco_path, list(set_names)), workers=workers)
    if dataset == "voc":
        return check_data(class_list=class_list, workers=workers, voc=training_sets(voc_paths, *set_names, voc_val))
    return check_data(csv_files=[path for path in csv_files if path], class_list=class_list, workers=workers)


def dataset_boxes(dataset: DetectionDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every box of a dataset as training reads it, clipped to its image (those left without area dropped):
    (G, 4) x1y1x2y2 in the pixels of the image files, the (G, 2) sizes (height, width) of their images, and
    their (G,) class indices."""
    boxes, sizes, labels = [np.zeros((0, 4), np.float32)], [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for index in tqdm(range(len(dataset)), desc="reading image sizes", unit="image", leave=False):
        annotations = dataset.load_annotations(index)  # (N, 5)
        if len(annotations) == 0:
            continue
        height, width = dataset.image_sizes[index]
        clipped, keep = clip_to_image(torch.from_numpy(annotations), height, width)
        clipped = clipped[keep].numpy()
        boxes.append(clipped[:, :4])
        sizes.append(np.tile([height, width], (len(clipped), 1)))  # (N, 2)
        labels.append(clipped[:, 4].astype(np.int64))
    return np.concatenate(boxes), np.concatenate(sizes), np.concatenate(labels)


def check_anchors(dataset: DetectionDataset, settings: ModelSettings, jitter: tuple[int, int] | None = None,
                  fit: bool = False) -> None:
    """Print how the anchors of `settings` cover the boxes of `dataset` at the image size of training (its
    min_size and max_size, or the jitter range) and, with `fit`, the anchors fitted to them."""
    boxes, image_sizes, labels = dataset_boxes(dataset)
    print(coverage_report(anchor_coverage(boxes, image_sizes, labels, settings, jitter), dataset.class_names, jitter))
    if fit and len(boxes):
        print(fit_report(boxes, image_sizes, settings, jitter))
