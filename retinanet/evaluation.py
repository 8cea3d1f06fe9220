"""Evaluation of a detector: its predictions on every image of a dataset (shared by the processes of a distributed
run), and Pascal VOC-style scores: per-class average precision at one IoU threshold (0.5 by default: VOC's metric,
the AP50 of the paper's §5 tables), per-class precision and recall at a score threshold, and one precision-recall
curve per class. COCO's AP@[.5:.95] is in data/coco.py.

Matching follows the VOC development kit: the detections of a class over the whole set are taken by decreasing
score; one is a true positive if the ground-truth box of its class it overlaps most in its image has
IoU >= the threshold and no higher-scoring detection has matched that box yet, otherwise a false positive. A
detection whose box is a difficult one (VOC's `difficult` objects) is neither, and difficult boxes found or not
count neither as hits nor as misses: they are left out of the curve and of the number of boxes to find. AP is
the area under the precision envelope (all points, VOC2010 and later) or, with use_07_metric, the mean envelope
precision at the 11 recall levels 0, 0.1, ..., 1 (VOC2007).

Legend for shapes: n detections, m ground-truth boxes (of one class in one image unless said otherwise).
"""

import os
import re
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import box_iou
from tqdm import tqdm

from .dataloader import DetectionDataset, clip_to_image, inference_loader
from .inference import predict

# [image][class] -> array: detections (n, 5) x1, y1, x2, y2, score, or annotations (m, 4) x1, y1, x2, y2, or (m, 5)
# with a fifth column 1 for a difficult box, 0 for any other
PerImagePerClass = list[list[np.ndarray]]
# What matching makes of a detection
FALSE_POSITIVE, TRUE_POSITIVE, ON_DIFFICULT = 0, 1, -1


class PRCurve(NamedTuple):
    """A class's detections over the whole set by decreasing score, with precision and recall after each."""

    scores: np.ndarray  # (n,) over all images
    precision: np.ndarray  # (n,) true positives / detections so far
    recall: np.ndarray  # (n,) true positives / num_annotations (0 if there are none)
    num_annotations: int  # difficult boxes left out


# --------------------------------------------------------------------------------------------- predictions


def predict_dataset(model: nn.Module, dataset: DetectionDataset, batch_size: int = 8, workers: int = 0,
                    rank: int = 0, world_size: int = 1) -> list[dict[str, np.ndarray] | None]:
    """inference.predict's detections on each image of `dataset`; or process `rank`'s share, the rest None."""
    pin_memory = next(model.parameters()).is_cuda
    loader = inference_loader(dataset, batch_size, workers, rank, world_size, pin_memory)
    predictions: list[dict[str, np.ndarray] | None] = [None] * len(dataset)
    with tqdm(total=len(dataset), desc="detecting", unit="image", disable=rank != 0) as progress:
        for index, prediction in predict(model, loader):
            predictions[index] = prediction
            progress.update(world_size)
    return predictions


def gather_predictions(predictions: list[dict | None], rank: int, world_size: int) -> list[dict] | None:
    """Every process's predictions (predict_dataset's, by rank) in one list on rank 0, None on the others; all call it."""
    if world_size == 1:
        return predictions
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(predictions, gathered, dst=0)
    if rank != 0:
        return None
    return [next(shard[index] for shard in gathered if shard[index] is not None) for index in range(len(predictions))]


def validation_score(model: nn.Module, dataset: DetectionDataset, batch_size: int = 8, workers: int = 0,
                     rank: int = 0, world_size: int = 1, coco: tuple[str, str] | None = None) -> float | None:
    """Validation mAP@0.5 (VOC-style), or COCO's AP@[.5:.95] given (output folder, set name); on rank 0."""
    if dataset is None:
        return None
    predictions = predict_dataset(model, dataset, batch_size, workers, rank, world_size)
    predictions = gather_predictions(predictions, rank, world_size)
    if predictions is None or coco is None:
        return predictions and evaluate(predictions, dataset)["mAP"]
    from .data.coco import evaluate_coco  # only for COCO's

    return evaluate_coco(predictions, dataset, *coco)[0]


def check_class_names(model_class_names: list[str], dataset_class_names: list[str]) -> None:
    """Raise ValueError unless a model's classes can be the dataset's: labels are indices, so both lists must
    match in length and order. Unnamed classes ("0", "1", ..., from a bare state dict) are matched by count."""
    if len(model_class_names) != len(dataset_class_names):
        raise ValueError(f"the model detects {len(model_class_names)} classes but the dataset has "
                         f"{len(dataset_class_names)}; evaluate with the class list the model was trained on")
    unnamed = [str(label) for label in range(len(model_class_names))]
    if list(model_class_names) not in (unnamed, list(dataset_class_names)):
        mismatches = [(label, model_name, dataset_name) for label, (model_name, dataset_name)
                      in enumerate(zip(model_class_names, dataset_class_names)) if model_name != dataset_name]
        raise ValueError(f"the model's class names differ from the dataset's (label, model, dataset): "
                         f"{mismatches[:5]}; labels are indices, so both class lists must be in the same order")


# ------------------------------------------------------------------------------------------------- matching


def split_difficult(ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, 4) boxes and (m,) bool difficult flags of ground truth given as (m, 4) or (m, 5) rows (see above)."""
    rows = np.asarray(ground_truth, dtype=np.float64)
    rows = rows.reshape(-1, rows.shape[-1] if rows.ndim == 2 else 4)  # an empty list: (0, 4)
    return rows[:, :4], rows[:, 4:].any(axis=1)  # (m, 4), (m,): no fifth column, no difficult box


def match_image(detections: np.ndarray, ground_truth: np.ndarray, iou_threshold: float,
                difficult: np.ndarray) -> np.ndarray:
    """(n,) TRUE_POSITIVE, FALSE_POSITIVE or ON_DIFFICULT: each of one image's (n, 5) detections of a class
    (x1, y1, x2, y2, score) against its (m, 4) boxes of that class, the (m,) `difficult` ones VOC's."""
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 5)  # (n, 5)
    ground_truth = np.asarray(ground_truth, dtype=np.float64).reshape(-1, 4)  # (m, 4)
    states = np.full(len(detections), FALSE_POSITIVE)
    if len(detections) == 0 or len(ground_truth) == 0:
        return states
    ious = box_iou(torch.from_numpy(detections[:, :4]), torch.from_numpy(ground_truth)).numpy()  # (n, m)
    best_match = ious.argmax(axis=1)  # (n,) the ground-truth box each detection overlaps most
    is_matched = np.zeros(len(ground_truth), dtype=bool)
    for detection in np.argsort(-detections[:, 4], kind="stable"):  # by decreasing score
        box = best_match[detection]
        if ious[detection, box] >= iou_threshold and difficult[box]:
            states[detection] = ON_DIFFICULT  # neither a hit nor a miss, however many detections find the box
        elif ious[detection, box] >= iou_threshold and not is_matched[box]:
            is_matched[box] = True
            states[detection] = TRUE_POSITIVE
        # else: a false positive, also when its best box was already matched (a duplicate detection)
    return states


def class_curve(detections: PerImagePerClass, annotations: PerImagePerClass, class_index: int,
                iou_threshold: float = 0.5) -> PRCurve:
    """Precision and recall of one class after each of its detections over the whole set, by decreasing score."""
    scores, hits, num_annotations = [], [], 0
    for image_detections, image_annotations in zip(detections, annotations):
        class_detections = np.asarray(image_detections[class_index], dtype=np.float64).reshape(-1, 5)  # (n, 5)
        ground_truth, difficult = split_difficult(image_annotations[class_index])  # (m, 4), (m,)
        states = match_image(class_detections, ground_truth, iou_threshold, difficult)
        counted = states != ON_DIFFICULT
        scores.append(class_detections[counted, 4])
        hits.append(states[counted] == TRUE_POSITIVE)
        num_annotations += int((~difficult).sum())
    scores = np.concatenate(scores)  # (n,) over all images
    order = np.argsort(-scores, kind="stable")  # stable: ties keep image order, as each image was matched
    true_positives = np.cumsum(np.concatenate(hits)[order])  # (n,)
    detections_so_far = np.arange(1, len(order) + 1)  # (n,)
    return PRCurve(scores[order], true_positives / detections_so_far,
                   true_positives / max(num_annotations, 1), num_annotations)  # no annotations: recall 0


def precision_recall_curves(detections: PerImagePerClass, annotations: PerImagePerClass,
                            iou_threshold: float = 0.5) -> dict[int, PRCurve]:
    """The PRCurve of each class k: detections[i][k] (n, 5) x1, y1, x2, y2, score of image i, annotations[i][k]
    (m, 4) x1, y1, x2, y2, or (m, 5) with a difficult flag."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    num_classes = len(annotations[0]) if annotations else 0
    if len(detections) != len(annotations) or {len(image) for image in [*detections, *annotations]} != {num_classes}:
        raise ValueError(f"expected one array per class of detections and of annotations for each of the same images, "
                         f"got {len(detections)} images of detections and {len(annotations)} of annotations")
    return {k: class_curve(detections, annotations, k, iou_threshold) for k in range(num_classes)}


# ------------------------------------------------------------------------------------------------- metrics


def precision_envelope(precision: np.ndarray) -> np.ndarray:
    """(n,) the best precision at each point of a curve or after it, at higher recall (VOC's interpolation)."""
    return np.maximum.accumulate(precision[::-1])[::-1]


def average_precision(precision: np.ndarray, recall: np.ndarray, use_07_metric: bool = False) -> float:
    """Area under the precision envelope (all points, VOC2010+), or its mean at 11 recalls (VOC2007)."""
    if use_07_metric:
        recall_levels = np.arange(11) / 10  # 0, 0.1, ..., 1.0 exactly as k / 10, the way recalls are computed
        return float(np.mean([precision[recall >= level].max(initial=0.0) for level in recall_levels]))
    envelope = precision_envelope(precision)  # (n,)
    recall_gained = np.diff(recall, prepend=0.0)  # (n,) zero for a false positive
    return float(np.sum(recall_gained * envelope))


def mean_average_precision(results: dict[int, tuple[float, int]]) -> float:
    """Mean AP over the classes that have annotations (AP is undefined without them); NaN if none has any."""
    annotated = [ap for ap, num_annotations in results.values() if num_annotations > 0]
    return float(np.mean(annotated)) if annotated else float("nan")


def operating_point(curve: PRCurve, pr_threshold: float) -> tuple[float, float]:
    """(precision, recall) of a class's detections of score >= pr_threshold; NaN where undefined."""
    kept = int(np.sum(curve.scores >= pr_threshold))  # the scores are sorted, so these are the first `kept`
    precision = float(curve.precision[kept - 1]) if kept else float("nan")
    if curve.num_annotations == 0:
        return precision, float("nan")
    return precision, float(curve.recall[kept - 1]) if kept else 0.0


def metrics_table(curves: dict[int, PRCurve], pr_threshold: float = 0.05, class_names: list[str] | None = None,
                  use_07_metric: bool = False) -> pd.DataFrame:
    """One row per class: class, AP, annotations, and precision and recall at the score threshold."""
    rows = [(class_names[k] if class_names is not None else str(k),
             average_precision(curve.precision, curve.recall, use_07_metric), curve.num_annotations,
             *operating_point(curve, pr_threshold)) for k, curve in curves.items()]
    return pd.DataFrame(rows, columns=["class", "AP", "annotations", "precision", "recall"])


# ------------------------------------------------------------------------------------- from model outputs


def detections_per_class(prediction: dict[str, np.ndarray], num_classes: int) -> list[np.ndarray]:
    """Split one image's predictions {"boxes" (D, 4), "scores" (D,), "labels" (D,)} into K arrays (n, 5)."""
    labels = prediction["labels"]
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"the model predicted labels {labels.min()}..{labels.max()}, the dataset has "
                         f"{num_classes} classes")
    rows = np.concatenate([prediction["boxes"], prediction["scores"][:, None]], axis=1)  # (D, 4) + (D, 1) -> (D, 5)
    return [rows[labels == k] for k in range(num_classes)]


def annotations_per_class(dataset: DetectionDataset, index: int, image_size: tuple[int, int]) -> list[np.ndarray]:
    """An image's annotations clipped to its size, as K arrays (m, 5) x1, y1, x2, y2, difficult."""
    clipped, keep = clip_to_image(torch.from_numpy(dataset.load_annotations(index)), *image_size)  # (N, 5), (N,)
    difficult = torch.from_numpy(dataset.load_difficult(index))[keep, None].float()  # (M, 1)
    rows = torch.cat([clipped[keep, :4], difficult], dim=1).numpy()  # (M, 4) + (M, 1) -> (M, 5)
    return [rows[clipped[keep, 4].numpy() == k] for k in range(dataset.num_classes)]


def save_pr_curves(
    curves: dict[int, PRCurve], class_names: list[str], output_dir: str, pr_threshold: float = 0.05,
    use_07_metric: bool = False,
) -> list[str]:
    """Write one precision-recall plot per annotated class, `{output_dir}/{k:03d}_{name}.png`; returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only with curves to draw
    from matplotlib.figure import Figure

    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for k, curve in curves.items():
        if curve.num_annotations == 0:
            continue
        figure = Figure(figsize=(5, 4.5))
        FigureCanvasAgg(figure)  # render off-screen with Agg; no display is needed
        axes = figure.add_subplot()
        axes.plot(curve.recall, curve.precision, label="precision")
        if len(curve.scores):
            envelope = precision_envelope(curve.precision)  # (n,)
            # from recall 0: the envelope holds its value over (previous recall, recall] ("steps-pre")
            axes.plot(np.concatenate([[0.0], curve.recall]), np.concatenate([envelope[:1], envelope]), "--",
                      drawstyle="steps-pre", label="envelope (all-point AP: the area below)")
        precision, recall = operating_point(curve, pr_threshold)
        axes.plot([recall], [precision], "o", label=f"score >= {pr_threshold:g}")
        ap = average_precision(curve.precision, curve.recall, use_07_metric)
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
                 title=f"{class_names[k]}: AP {ap:.3f}, {curve.num_annotations} boxes")
        axes.legend(loc="best")
        safe_name = re.sub(r"[^\w.-]+", "_", class_names[k])
        path = os.path.join(output_dir, f"{k:03d}_{safe_name}.png")
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def evaluate(predictions: list[dict[str, np.ndarray]], dataset: DetectionDataset, iou_threshold: float = 0.5,
             pr_threshold: float = 0.05, use_07_metric: bool | None = None, pr_curves_dir: str | None = None) -> dict:
    """Score predictions on `dataset`: per-class AP and, read at pr_threshold, precision and recall, and the mAP, printed
    (and plotted into pr_curves_dir); {"mAP": (NaN without annotations), "per_class": metrics_table's}."""
    num_classes = dataset.num_classes
    use_07_metric = dataset.use_07_metric if use_07_metric is None else use_07_metric
    detections = [detections_per_class(prediction, num_classes) for prediction in predictions]
    annotations = [annotations_per_class(dataset, index, prediction["image_size"])
                   for index, prediction in enumerate(predictions)]
    curves = precision_recall_curves(detections, annotations, iou_threshold)
    table = metrics_table(curves, pr_threshold, dataset.class_names, use_07_metric)
    mean_ap = mean_average_precision(dict(enumerate(zip(table["AP"], table["annotations"]))))  # the table's APs
    metric = "11-point VOC2007" if use_07_metric else "all-point VOC2010+"
    print(f"AP at IoU {iou_threshold:g} ({metric}); precision and recall of detections with score >= "
          f"{pr_threshold:g}:")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    num_annotated = int((table["annotations"] > 0).sum())
    print(f"mAP: {mean_ap:.4f} (mean over the {num_annotated} of {num_classes} classes that have annotations)")
    if pr_curves_dir is not None:
        paths = save_pr_curves(curves, dataset.class_names, pr_curves_dir, pr_threshold, use_07_metric)
        print(f"saved {len(paths)} precision-recall curves to {os.path.abspath(pr_curves_dir)}")
    return {"mAP": mean_ap, "per_class": table}

