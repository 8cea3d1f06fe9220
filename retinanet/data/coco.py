"""COCO: the instances files read and checked into a DetectionDataset, and the paper's main metric (§5: AP averaged
over IoU thresholds 0.5:0.95, with AP50, AP75 and AP by object size as in Table 2), detections in COCO's results
format written to a JSON file and scored by pycocotools' COCOeval. Every problem of a file is a ValueError naming
the file and the entry.
"""

import contextlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..dataloader import MAX_LISTED, DetectionDataset, Transform, raise_if_missing, require_file, write_text_atomically

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


class CocoDataset(DetectionDataset):
    """Boxes from `{root}/annotations/instances_{set_name}.json`, images from `{root}/images/{set_name}/` or
    `{root}/{set_name}/`. COCO category ids (sorted) map to class indices 0..K-1 and back. Crowd boxes are
    skipped, zero-area boxes dropped with a warning, images without boxes kept as negatives. Missing image files
    raise ValueError unless check_files is False (diagnostics/check.py then reports each one). Image sizes are the
    JSON's."""

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
            raise_if_missing(annotation_file, image_paths, [f"image id {image_id}" for image_id in self.image_ids])
        zero_area: list[int] = []
        annotations = [self._boxes_of_image(image_id, annotation_file, zero_area) for image_id in self.image_ids]
        if zero_area:
            print(f"{annotation_file}: dropped {len(zero_area)} zero-area box(es), annotation ids "
                  f"{zero_area[:MAX_LISTED]}")
        class_names = [self.coco.cats[coco_id]["name"] for coco_id in category_ids]
        sizes = [(self.coco.imgs[image_id]["height"], self.coco.imgs[image_id]["width"]) for image_id in self.image_ids]
        super().__init__(image_paths, annotations, class_names, transform, image_sizes=sizes)

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


# ------------------------------------------------------------------------------------------------ evaluation

# COCO's detection rules allow at most 100 detections per image. (COCOeval itself keeps its largest maxDets, 100,
# per image and category, so more per image would be scored: the cap makes results comparable to published ones.)
MAX_DETECTIONS_PER_IMAGE = 100
# The 12 numbers of COCOeval.summarize(), in order (AR@k: recall with at most k detections per image)
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large")


def coco_results(predictions: list[dict[str, np.ndarray]], dataset: CocoDataset,
                 max_detections: int = MAX_DETECTIONS_PER_IMAGE) -> list[dict]:
    """COCO results entries {"image_id", "category_id", "bbox": [x, y, width, height], "score"} from
    predict_dataset's output (boxes in original pixels), the `max_detections` highest-scoring of each image."""
    if len(predictions) != len(dataset.image_ids):
        raise ValueError(f"{len(predictions)} predictions for a dataset of {len(dataset.image_ids)} images")
    results = []
    for index, prediction in enumerate(predictions):
        top = np.argsort(-prediction["scores"], kind="stable")[:max_detections]
        for box, score, label in zip(prediction["boxes"][top], prediction["scores"][top], prediction["labels"][top]):
            if int(label) not in dataset.label_to_coco_id:
                raise ValueError(f"predicted label {int(label)} has no COCO category; the dataset has "
                                 f"{len(dataset.label_to_coco_id)} classes")
            x1, y1, x2, y2 = (float(value) for value in box)
            results.append({
                "image_id": int(dataset.image_ids[index]),
                "category_id": int(dataset.label_to_coco_id[int(label)]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score),
            })
    return results


def run_cocoeval(coco_gt: COCO, results: list[dict], image_ids: Sequence[int],
                 max_detections: int = MAX_DETECTIONS_PER_IMAGE) -> list[float]:
    """COCOeval("bbox") of `results` on the images `image_ids`, counting the `max_detections` best of each image
    (COCO's 100 by default); prints its 12-line summary and returns the 12 stats (STAT_NAMES; -1 where the ground
    truth has no box of that size). No detections at all give zeros."""
    if len(image_ids) == 0:
        raise ValueError("no images to evaluate on")
    if not results:
        print("no detections at all: every COCO metric is 0")  # pycocotools' loadRes fails on an empty list
        return [0.0] * len(STAT_NAMES)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress and timing lines
        detections = coco_gt.loadRes([dict(result) for result in results])  # copies: loadRes adds keys to each
        evaluator = COCOeval(coco_gt, detections, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.params.maxDets = [1, 10, max_detections]  # COCO's [1, 10, 100]: AP counts the last
        evaluator.evaluate()
        evaluator.accumulate()
    evaluator.summarize()
    return [float(stat) for stat in evaluator.stats]


def results_path(output_dir: str, set_name: str | None) -> str:
    """`{output_dir}/{set_name}_bbox_results.json`, or `{output_dir}/bbox_results.json` without a set name."""
    return os.path.join(output_dir, f"{set_name}_bbox_results.json" if set_name else "bbox_results.json")


def evaluate_coco(
    predictions: list[dict[str, np.ndarray]],
    dataset: CocoDataset,
    output_dir: str = ".",
    set_name: str | None = None,
    max_detections: int = MAX_DETECTIONS_PER_IMAGE,
) -> list[float]:
    """Score predict_dataset's predictions on `dataset`: write them to results_path(output_dir, set_name), run
    COCOeval counting `max_detections` an image and return its 12 stats (stats[0] is AP@[.5:.95])."""
    results = coco_results(predictions, dataset, max_detections)
    os.makedirs(output_dir, exist_ok=True)
    path = results_path(output_dir, set_name)
    write_text_atomically(path, json.dumps(results))
    print(f"wrote {len(results)} detections on {len(dataset)} images to {os.path.abspath(path)}")
    return run_cocoeval(dataset.coco, results, dataset.image_ids, max_detections)
