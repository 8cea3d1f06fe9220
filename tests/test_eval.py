"""Tests of the evaluation code: VOC-style AP against hand-computed values, per-class precision and recall, the
mapping of detections back to original pixels, and the COCO results and COCOeval path. No trained model needed:
retinanet.evaluation, retinanet.data.coco and their scripts import the model code only to load a checkpoint."""

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import csv_eval

from retinanet import evaluation
from retinanet.data import coco as coco_evaluation
from retinanet.data.coco import CocoDataset
from retinanet.dataloader import CSVDataset, build_transform
from retinanet.evaluation import check_class_names, predict_dataset


def boxes(*rows) -> np.ndarray:
    """(m, 4) ground-truth boxes."""
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def scored(*rows) -> np.ndarray:
    """(n, 5) detections x1, y1, x2, y2, score."""
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


NONE_4, NONE_5 = boxes(), scored()
A, B, C, D = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]  # disjoint 10 x 10 boxes
FAR = [100, 100, 110, 110]  # overlaps nothing


# ----------------------------------------------------------------------------------------- VOC-style AP


def average_precisions(detections, annotations, iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict:
    """{class k: (AP, number of annotated boxes)} of per-image, per-class arrays, as evaluate's table has them."""
    curves = evaluation.precision_recall_curves(detections, annotations, iou_threshold)
    table = evaluation.metrics_table(curves, use_07_metric=use_07_metric)
    return dict(enumerate(zip(table["AP"], table["annotations"])))


def test_perfect_detector_has_ap_one():
    detections = [[scored(A + [0.9], B + [0.8]), scored(C + [0.7])], [NONE_5, scored(D + [0.6])]]
    annotations = [[boxes(A, B), boxes(C)], [NONE_4, boxes(D)]]
    assert average_precisions(detections, annotations) == {0: (1.0, 2), 1: (1.0, 2)}


def test_duplicate_detection_is_a_false_positive():
    # By score: A (TP), A again (FP: A is already matched), B (TP). Two boxes.
    #   precision 1/1, 1/2, 2/3; recall 1/2, 1/2, 2/2; envelope 1, 2/3, 2/3
    #   AP = (1/2 - 0) * 1 + (1/2 - 1/2) * 2/3 + (1 - 1/2) * 2/3 = 1/2 + 1/3 = 5/6
    detections = [[scored(A + [0.9], A + [0.8], B + [0.7])]]
    ap, num_annotations = average_precisions(detections, [[boxes(A, B)]])[0]
    assert ap == pytest.approx(5 / 6)
    assert num_annotations == 2


def test_detection_of_the_wrong_class_does_not_match():
    detections = [[NONE_5, scored(A + [0.9])]]  # class 1 detected where class 0 is annotated
    annotations = [[boxes(A), NONE_4]]
    results = average_precisions(detections, annotations)
    assert results == {0: (0.0, 1), 1: (0.0, 0)}  # class 0 has no detection; class 1 no annotation
    assert evaluation.mean_average_precision(results) == 0.0  # the mean over class 0 alone


@pytest.mark.parametrize("height, expected_ap", [(4.9, 0.0), (5.0, 1.0), (5.1, 1.0)])
def test_iou_threshold_is_inclusive(height, expected_ap):
    # box (0, 0, 10, h) inside A = (0, 0, 10, 10): IoU = 10h / 100, so 0.49, exactly 0.5 and 0.51
    detections = [[scored([0, 0, 10, height, 0.9])]]
    ap, _ = average_precisions(detections, [[boxes(A)]], iou_threshold=0.5)[0]
    assert ap == expected_ap


def test_class_with_no_detections_has_ap_zero():
    assert average_precisions([[NONE_5]], [[boxes(A, B)]]) == {0: (0.0, 2)}


def test_class_without_annotations_is_left_out_of_the_mean():
    detections = [[scored(A + [0.9]), scored(B + [0.8])]]  # class 1's detection is a false positive
    annotations = [[boxes(A), NONE_4]]
    results = average_precisions(detections, annotations)
    assert results == {0: (1.0, 1), 1: (0.0, 0)}
    assert evaluation.mean_average_precision(results) == 1.0  # not (1 + 0) / 2
    assert np.isnan(evaluation.mean_average_precision({0: (0.0, 0)}))


# Four boxes over two images; by decreasing score, across the images:
#   score   0.9  0.8  0.7  0.6  0.5  0.4        (D is never detected)
#   match   A    FP   C    FP   FP   B
#   TP      1    1    2    2    2    3
#   prec.   1    1/2  2/3  1/2  2/5  1/2        = TP / detections so far
#   recall  1/4  1/4  2/4  2/4  2/4  3/4        = TP / 4
#   envel.  1    2/3  2/3  1/2  1/2  1/2        = best precision from here on
MIXED_DETECTIONS = [
    [scored(A + [0.9], FAR + [0.6], B + [0.4])],
    [scored(FAR + [0.8], C + [0.7], FAR + [0.5])],
]
MIXED_ANNOTATIONS = [[boxes(A, B)], [boxes(C, D)]]


def test_all_point_ap_of_interleaved_true_and_false_positives():
    # AP = sum of recall gained x envelope = 1/4 * 1 + 1/4 * 2/3 + 1/4 * 1/2 = 6/24 + 4/24 + 3/24 = 13/24
    ap, num_annotations = average_precisions(MIXED_DETECTIONS, MIXED_ANNOTATIONS)[0]
    assert ap == pytest.approx(13 / 24)
    assert num_annotations == 4


def test_eleven_point_ap_of_voc2007():
    # best precision at recall >= r:
    #   r = 0, 0.1, 0.2       -> 1      (all detections)
    #   r = 0.3, 0.4, 0.5     -> 2/3    (recall 2/4 and 3/4: max(2/3, 1/2, 2/5, 1/2))
    #   r = 0.6, 0.7          -> 1/2    (recall 3/4 only)
    #   r = 0.8, 0.9, 1.0     -> 0      (never reached)
    #   AP = (3 * 1 + 3 * 2/3 + 2 * 1/2 + 3 * 0) / 11 = 6/11
    ap, _ = average_precisions(MIXED_DETECTIONS, MIXED_ANNOTATIONS, use_07_metric=True)[0]
    assert ap == pytest.approx(6 / 11)


def test_curve_lists_precision_and_recall_after_each_detection():
    curve = evaluation.precision_recall_curves(MIXED_DETECTIONS, MIXED_ANNOTATIONS)[0]
    np.testing.assert_allclose(curve.scores, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5, 1 / 2])
    np.testing.assert_allclose(curve.recall, [1 / 4, 1 / 4, 2 / 4, 2 / 4, 2 / 4, 3 / 4])


def test_inconsistent_inputs_raise_value_error():
    with pytest.raises(ValueError, match="images"):
        average_precisions([[NONE_5]], [[NONE_4], [NONE_4]])
    with pytest.raises(ValueError, match="one array per class"):
        average_precisions([[NONE_5]], [[NONE_4, NONE_4]])


# ------------------------------------------------------------------------------ per-class precision and recall


def test_precision_and_recall_are_computed_per_class():
    # Regression test: yhenon's csv_eval printed the last class's precision and recall for every class.
    # class 0, two boxes: at score >= 0.5, A (TP) and FAR (FP): precision 1/2, recall 1/2; the TP on B at
    #   score 0.3 is below the threshold (it counts for AP only).
    # class 1, one box: C (TP): precision 1, recall 1.
    # class 2, no boxes: one FP, precision 0, recall undefined.
    detections = [[scored(A + [0.9], FAR + [0.8], B + [0.3]), scored(C + [0.7]), scored(D + [0.6])]]
    annotations = [[boxes(A, B), boxes(C), NONE_4]]
    curves = evaluation.precision_recall_curves(detections, annotations)
    table = evaluation.metrics_table(curves, pr_threshold=0.5, class_names=["cat", "dog", "cow"])
    assert list(table.columns) == ["class", "AP", "annotations", "precision", "recall"]
    assert list(table["class"]) == ["cat", "dog", "cow"]
    assert list(table["annotations"]) == [2, 1, 0]
    np.testing.assert_allclose(table["precision"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(table["recall"], [0.5, 1.0, np.nan])
    # class 0's AP over all detections: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2 * 1 + 1/2 * 2/3 = 5/6
    np.testing.assert_allclose(table["AP"], [5 / 6, 1.0, 0.0])


def test_operating_point_without_detections_above_the_threshold():
    curve = evaluation.precision_recall_curves([[scored(A + [0.2])]], [[boxes(A)]])[0]
    precision, recall = evaluation.operating_point(curve, pr_threshold=0.5)
    assert np.isnan(precision)  # 0 / 0 detections
    assert recall == 0.0


# ----------------------------------------------------------------------------------- from images and a model


def save_image(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 60, 200)).save(path)


class FixedDetector(nn.Module):
    """Returns the same detections for every image, or one box over the whole input tensor (whole=True)."""

    def __init__(self, whole: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # predict_dataset reads the device from the parameters
        self.whole = whole
        self.batch_sizes = []

    def forward(self, images, image_sizes=None):
        self.batch_sizes.append(len(images))
        height, width = images.shape[-2:]
        box = [0.0, 0.0, float(width), float(height)] if self.whole else [8.0, 16.0, 1000.0, 24.0]
        return [
            {"boxes": torch.tensor([box]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
            for _ in images
        ]


def write_csv_dataset(tmp_path, sizes, rows):
    for i, (width, height) in enumerate(sizes):
        save_image(tmp_path / f"{i}.png", width, height)
    (tmp_path / "classes.csv").write_text("cat,0\ndog,1\n")
    (tmp_path / "val.csv").write_text("".join(f"{row}\n" for row in rows))
    return str(tmp_path / "val.csv"), str(tmp_path / "classes.csv")


def test_predict_dataset_maps_boxes_back_to_original_pixels(tmp_path):
    # (width, height): landscape, portrait, landscape; the shorter side is resized to 40 pixels
    sizes = [(40, 20), (20, 40), (60, 30)]
    annotations, classes = write_csv_dataset(tmp_path, sizes, [f"{i}.png,,,,," for i in range(3)])
    dataset = CSVDataset(annotations, classes, build_transform(False, min_size=40, max_size=80))
    model = FixedDetector().eval()
    predictions = predict_dataset(model, dataset, batch_size=2)
    # scale 40 / 20 = 2, 2 and 40 / 30 = 4/3; (8, 16, 1000, 24) / scale, then clipped to the original width
    np.testing.assert_allclose(predictions[0]["boxes"], [[4, 8, 40, 12]])
    np.testing.assert_allclose(predictions[1]["boxes"], [[4, 8, 20, 12]])
    np.testing.assert_allclose(predictions[2]["boxes"], [[6, 12, 60, 18]], rtol=1e-6)
    assert sorted(model.batch_sizes) == [1, 2]  # batched, the two landscape images together
    assert predictions[0]["scores"].dtype == np.float32 and predictions[0]["labels"].dtype == np.int64


def test_predict_dataset_refuses_a_model_in_training_mode(tmp_path):
    annotations, classes = write_csv_dataset(tmp_path, [(32, 32)], ["0.png,,,,,"])
    with pytest.raises(ValueError, match="eval mode"):
        predict_dataset(FixedDetector().train(), CSVDataset(annotations, classes))


def test_evaluate_prints_the_table_and_saves_curves(tmp_path, capsys):
    # Three 32 x 32 images, each annotated with one box over the whole image: cat, cat, dog. The model finds a
    # cat over each whole image (64 x 64 after resizing): cat AP 1 (both cats found before the false positive,
    # whose score ties and comes after them in image order), precision 2/3, recall 1; dog AP 0. mAP 1/2.
    rows = ["0.png,0,0,32,32,cat", "1.png,0,0,32,32,cat", "2.png,0,0,32,32,dog"]
    annotations, classes = write_csv_dataset(tmp_path, [(32, 32)] * 3, rows)
    dataset = CSVDataset(annotations, classes, build_transform(False, min_size=64, max_size=64))
    predictions = predict_dataset(FixedDetector(whole=True).eval(), dataset)
    result = evaluation.evaluate(predictions, dataset, pr_curves_dir=str(tmp_path / "curves"))
    assert result["mAP"] == pytest.approx(0.5)
    table = result["per_class"]
    np.testing.assert_allclose(table["AP"], [1.0, 0.0])
    np.testing.assert_allclose(table["precision"], [2 / 3, np.nan])
    np.testing.assert_allclose(table["recall"], [1.0, 0.0])
    assert sorted(path.name for path in (tmp_path / "curves").iterdir()) == ["000_cat.png", "001_dog.png"]
    output = capsys.readouterr().out
    assert "cat" in output and "mAP: 0.5000" in output


def test_ground_truth_is_clipped_to_the_image_as_the_predictions_are(tmp_path):
    # A 32 x 32 image annotated with a box reaching to x = 70: training clips it to the image, and so does the
    # evaluation, where the predictions (clipped to the image too) are compared with it. Unclipped, the whole-image
    # detection would have IoU 32 / 70 with it, a miss.
    annotations, classes = write_csv_dataset(tmp_path, [(32, 32)], ["0.png,0,0,70,32,cat"])
    dataset = CSVDataset(annotations, classes, build_transform(False, min_size=32, max_size=32))
    predictions = predict_dataset(FixedDetector(whole=True).eval(), dataset)
    assert evaluation.evaluate(predictions, dataset)["mAP"] == pytest.approx(1.0)


def test_class_names_of_model_and_dataset_must_agree():
    check_class_names(["cat", "dog"], ["cat", "dog"])
    check_class_names(["0", "1"], ["cat", "dog"])  # a bare state dict has unnamed classes
    with pytest.raises(ValueError, match="2 classes but the dataset has 3"):
        check_class_names(["cat", "dog"], ["cat", "dog", "cow"])
    with pytest.raises(ValueError, match="same order"):
        check_class_names(["dog", "cat"], ["cat", "dog"])


def test_csv_eval_script_reports_a_missing_file_without_traceback(trained_shapes_run, tmp_path, capsys):
    missing = str(tmp_path / "missing.csv")
    arguments = ["--csv_val", missing, "--classes", missing, "--model", trained_shapes_run.checkpoint,
                 "--device", "cpu"]  # the model is loaded first, then the dataset read
    status = csv_eval.main(arguments)
    assert status == 2
    error = capsys.readouterr().err
    assert "missing.csv" in error and "Traceback" not in error


def test_the_evaluation_code_imports_without_the_model_code(monkeypatch):
    for name in ("retinanet.model", "retinanet.checkpoint"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    for name in ("retinanet.evaluation", "retinanet.data.coco", "retinanet.dataloader", "retinanet.inference"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # import these afresh; restored after the test
    importlib.import_module("retinanet.evaluation")
    importlib.import_module("retinanet.data.coco")


# ---------------------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_dataset(tmp_path):
    """Three images, categories 3 (cat) and 7 (dog), which become labels 0 and 1; image 30 has no boxes."""
    images = [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 20, "file_name": "b.png", "width": 50, "height": 60},
              {"id": 30, "file_name": "c.png", "width": 32, "height": 32}]
    boxes_xywh = [(10, 3, [2, 3, 20, 15]), (10, 7, [25, 10, 10, 12]), (20, 7, [5, 5, 40, 50]), (20, 3, [0, 0, 8, 9])]
    annotations = [{"id": i + 1, "image_id": image_id, "category_id": category, "bbox": bbox, "area": bbox[2] * bbox[3],
                    "iscrowd": 0} for i, (image_id, category, bbox) in enumerate(boxes_xywh)]
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for image in images:
        save_image(tmp_path / "images" / "val" / image["file_name"], image["width"], image["height"])
    return CocoDataset(str(tmp_path), "val")


def ground_truth_as_predictions(dataset) -> list[dict]:
    predictions = []
    for i in range(len(dataset)):
        annotations = dataset.load_annotations(i)  # (N, 5) in original pixels
        predictions.append({"boxes": annotations[:, :4], "scores": np.ones(len(annotations), dtype=np.float32),
                            "labels": annotations[:, 4].astype(np.int64)})
    return predictions


def test_coco_results_of_the_ground_truth_score_ap_one(coco_dataset):
    results = coco_evaluation.coco_results(ground_truth_as_predictions(coco_dataset), coco_dataset)
    assert {(r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results} == {
        (10, 3, (2, 3, 20, 15)), (10, 7, (25, 10, 10, 12)), (20, 7, (5, 5, 40, 50)), (20, 3, (0, 0, 8, 9))}
    stats = coco_evaluation.run_cocoeval(coco_dataset.coco, results, coco_dataset.image_ids)
    assert len(stats) == 12
    assert stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert stats[1] == pytest.approx(1.0)  # AP50
    assert "category_id" in results[0] and "segmentation" not in results[0]  # loadRes worked on copies


def test_coco_results_keep_the_100_best_detections_per_image(coco_dataset):
    scores = np.linspace(0.01, 1.0, 150, dtype=np.float32)
    many = {"boxes": np.tile([[1.0, 1.0, 5.0, 5.0]], (150, 1)), "scores": scores, "labels": np.zeros(150, np.int64)}
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    results = coco_evaluation.coco_results([many, empty, empty], coco_dataset)
    assert len(results) == 100
    assert min(r["score"] for r in results) == pytest.approx(scores[50])


def test_no_detections_give_zeros_without_crashing(coco_dataset, capsys):
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    results = coco_evaluation.coco_results([empty] * 3, coco_dataset)
    assert results == []
    assert coco_evaluation.run_cocoeval(coco_dataset.coco, results, coco_dataset.image_ids) == [0.0] * 12
    assert "no detections" in capsys.readouterr().out


def test_evaluate_coco_writes_the_results_file(coco_dataset, tmp_path):
    coco_dataset.transform = build_transform(False, min_size=32, max_size=64)
    predictions = predict_dataset(FixedDetector().eval(), coco_dataset, batch_size=2)
    stats = coco_evaluation.evaluate_coco(predictions, coco_dataset, output_dir=str(tmp_path / "out"), set_name="val")
    results = json.loads((tmp_path / "out" / "val_bbox_results.json").read_text())
    assert len(results) == 3 and {r["category_id"] for r in results} == {3}
    assert len(stats) == 12
    assert not (tmp_path / "out" / "val_bbox_results.json.tmp").exists()
