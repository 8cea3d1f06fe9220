"""Dense scenes: the caps of §4.1 "Inference" (candidates per level, NMS, detections per image) are flags of the
scripts that run a model, and a run says when an image reached the cap."""

import os

import torch

import coco_eval
import csv_eval
import predict
import visualize

from retinanet.checkpoint import load_model
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings

SIDE = 1024  # a 1024 x 1024 image: P3 is a 128 x 128 grid of 8-pixel cells


def dense_scene_outputs(model: RetinaNet, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and deltas of a network that sees `count` objects, each exactly the square 32 x 32 anchor of its own
    P3 cell, 5 cells (40 pixels) apart, so that no two overlap: (1, R, 1) and (1, R, 4)."""
    num_anchors = sum(model.anchors.num_per_level(SIDE, SIDE))
    logits = torch.full((1, num_anchors, 1), -10.0)
    square = model.settings.num_anchors // 2 - 1  # ratio 1:1, scale 2^0: the 4th of 9 (ratio major, scale minor)
    cells = [(row, column) for row in range(2, 125, 5) for column in range(2, 125, 5)][:count]  # inside the image
    for number, (row, column) in enumerate(cells):
        logits[0, (row * 128 + column) * model.settings.num_anchors + square, 0] = 4.0 - number * 1e-3
    return logits, torch.zeros(1, num_anchors, 4)


def test_a_scene_of_350_objects_is_cut_at_100_and_found_whole_with_a_raised_cap():
    model = RetinaNet(ModelSettings(num_classes=1, depth=18)).eval()
    logits, deltas = dense_scene_outputs(model, 350)
    (capped,) = model.detect(logits, deltas, (SIDE, SIDE))
    assert len(capped["boxes"]) == 100  # COCO's cap, the default
    raised = RetinaNet(model.settings.replace(max_detections=400)).eval()
    (whole,) = raised.detect(logits, deltas, (SIDE, SIDE))
    assert len(whole["boxes"]) == 350 and len(torch.unique(whole["boxes"], dim=0)) == 350
    assert torch.equal(whole["boxes"][:100], capped["boxes"])  # the best 100 are the same
    sides = whole["boxes"][:, 2:] - whole["boxes"][:, :2]
    torch.testing.assert_close(sides, torch.full_like(sides, 32.0))
    fewer = RetinaNet(model.settings.replace(max_detections=400, topk_candidates=200)).eval()
    assert len(fewer.detect(logits, deltas, (SIDE, SIDE))[0]["boxes"]) == 200  # P3 keeps its 200 best


def test_the_scripts_take_the_caps_and_say_when_an_image_reached_one(trained_shapes_run, tmp_path, capsys):
    data = trained_shapes_run.data_dir
    model_flags = ["--model", trained_shapes_run.checkpoint, "--device", "cpu", "--workers", "0"]
    caps = ["--max_detections", "3", "--nms_threshold", "0.3", "--topk_candidates", "50"]
    low = ["--score_threshold", "0.001"]  # a 2-iteration model scores about the prior, 0.01
    assert csv_eval.main(["--csv_val", f"{data}/val.csv", "--classes", f"{data}/classes.csv",
                          *model_flags, *caps, *low]) == 0
    assert "4 of 4 images reached the cap of 3 detections an image" in capsys.readouterr().out  # a barely trained model
    found = tmp_path / "found.csv"
    assert predict.main([os.path.join(data, "images", "val"), "--output", str(found), *model_flags, *caps,
                         "--score_threshold", "0.001"]) == 0
    assert "reached the cap of 3 detections" in capsys.readouterr().out
    assert len(found.read_text().splitlines()) == 12  # 3 detections in each of the 4 images
    assert coco_eval.main(["--coco_path", data, "--val_set", "val", *model_flags, "--output_dir", str(tmp_path),
                           "--max_detections", "300", *low]) == 0
    assert "no image reached the cap of 300 detections" in capsys.readouterr().out
    assert visualize.main(["--images", os.path.join(data, "images", "val"), "--output_dir", str(tmp_path / "drawn"),
                           *model_flags, *caps, *low]) == 0
    assert "4 of 4 images reached the cap of 3 detections an image" in capsys.readouterr().out
    settings = load_model(trained_shapes_run.checkpoint, max_detections=3, nms_threshold=0.3).model.settings
    assert (settings.max_detections, settings.nms_threshold) == (3, 0.3)
