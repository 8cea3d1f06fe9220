import json

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from tools.benchmark import BUILDERS, build_torchvision, main, parse_args, synthetic_batches

TINY_RUN = [
    "--device", "cpu", "--depth", "18", "--image_size", "64", "64", "--batch_size", "2", "--steps", "1",
    "--warmup", "0", "--modes", "train", "infer_b1", "data", "--memory_formats", "contiguous", "--no_amp",
    "--threads", "1",  # quicker than two on a shared machine; nothing here is a timing assertion
]


def test_benchmark_emits_a_record_per_measurement_for_both_models(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        records = main([*TINY_RUN, "--output", str(tmp_path / "records.jsonl")])
    finally:
        torch.set_num_threads(threads)  # as the other tests expect it
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == records
    assert [(record["impl"], record["mode"]) for record in records] == [
        ("ours", "train"), ("torchvision", "train"), ("ours", "infer_b1"), ("torchvision", "infer_b1"),
        ("ours", "data"),
    ]
    for record in records:
        assert record["img_per_s"] > 0 and record["ms"] > 0 and record["peak_gib"] > 0
    waits = {(record["impl"], record["mode"]): record["host_waits"] for record in records}
    assert waits[("ours", "train")] == 1  # the step's one read; torchvision's loss waits once or more per image
    assert waits[("torchvision", "train")] > 2 * waits[("ours", "train")]
    written = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert written == records


def test_synthetic_batches_agree_between_the_two_input_formats():
    for batch in synthetic_batches(batch_size=3, image_size=(64, 96), num_classes=5, device=torch.device("cpu")):
        assert batch.images.shape == (3, 3, 64, 96)
        for rows, target in zip(batch.annotations, batch.targets):
            count = len(target["boxes"])
            assert 1 <= count <= 15
            torch.testing.assert_close(rows[:count, :4], target["boxes"])
            assert torch.equal(rows[:count, 4].long(), target["labels"])
            assert (rows[count:] == -1).all()  # padding rows
            boxes = target["boxes"]
            assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()


def test_torchvision_model_at_depth_50_is_retinanet_resnet50_fpn():
    built = build_torchvision(parse_args(["--depth", "50", "--num_classes", "7"]), None, torch.device("cpu")).model
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7)
    shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    assert {name: tensor.shape for name, tensor in built.state_dict().items()} == shapes


@pytest.mark.parametrize("freeze_at", [0, 2])
def test_both_models_freeze_the_same_backbone_parameters(freeze_at):
    args = parse_args(["--depth", "18", "--freeze_at", str(freeze_at)])
    frozen = {}
    for impl, build in BUILDERS.items():
        parameters = build(args, None, torch.device("cpu")).model.named_parameters()
        frozen[impl] = {name.replace("backbone.body.", "backbone.") for name, p in parameters if not p.requires_grad}
    assert frozen["ours"] == frozen["torchvision"]
    assert bool(frozen["ours"]) == (freeze_at > 0)
