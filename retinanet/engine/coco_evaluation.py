"""COCO evaluation of a detector (the paper's main metric, §5: AP averaged over IoU thresholds 0.5:0.95, with
AP50, AP75 and AP by object size as in Table 2): detections in COCO's results format, written to a JSON file,
and scored by pycocotools' COCOeval."""

import contextlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.datasets import CocoDataset
from ..data.files import write_text_atomically

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
