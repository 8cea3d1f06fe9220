"""One recipe, carried everywhere: a model's settings are saved with it, and every reader of a checkpoint (resume,
fine-tuning, evaluation) rebuilds exactly the model that was trained, its loss and its inference included."""

import os

import pytest
import torch
import torchvision
from conftest import tiny_run_flags

import csv_eval
import train

from retinanet.anchors import decode, encode
from retinanet.checkpoint import checkpoint_settings, load_model, read_checkpoint, save_checkpoint
from retinanet.extras.interop import convert_torchvision
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings


@pytest.fixture(scope="module")
def converted_torchvision(tmp_path_factory) -> str:
    """A checkpoint converted from a (random) torchvision retinanet_resnet50_fpn with 3 classes."""
    path = tmp_path_factory.mktemp("converted") / "torchvision.pt"
    torch.manual_seed(0)
    reference = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    save_checkpoint(convert_torchvision(reference.state_dict(), source_eps=1e-5), str(path))
    return str(path)


def test_a_model_trains_with_the_box_coding_it_detects_with(converted_torchvision):
    model = load_model(read_checkpoint(converted_torchvision), num_classes=5).model
    assert model.settings.box_coder_std == (1.0, 1.0, 1.0, 1.0) and model.settings.p6_from == "p5"
    # The model's forward hands its own settings to the loss and to detect: they cannot disagree. A perfectly learnt
    # offset (the loss's regression target) decodes, at inference, to the box itself.
    anchor, box = torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[4.0, 2.0, 30.0, 40.0]])
    target = encode(anchor, box, model.settings.box_coder_std)
    torch.testing.assert_close(decode(anchor, target, model.settings.box_coder_std), box)


def csv_flags(data: str, output: str) -> list[str]:
    return ["--dataset", "csv", "--csv_train", os.path.join(data, "train.csv"), "--classes",
            os.path.join(data, "classes.csv"), "--output_dir", output, "--batch_size", "4", "--min_size", "96",
            "--max_size", "96", "--workers", "0", "--eval_every", "0", "--no_pretrained", "--device", "cpu"]


@pytest.mark.slow
def test_fine_tune_converted_torchvision_weights_then_resume_then_evaluate(converted_torchvision, trained_shapes_run,
                                                                            tmp_path, capsys):
    data, output = trained_shapes_run.data_dir, str(tmp_path / "tuned")
    # Fine-tune without ImageNet weights: BatchNorm and the first stage are frozen as the converted weights need.
    assert train.main(csv_flags(data, output) + ["--fine_tune", converted_torchvision, "--iters", "1"]) == 0
    tuned = read_checkpoint(os.path.join(output, "last.pt"))
    settings = checkpoint_settings(tuned)
    assert (settings.p6_from, settings.box_coder_std, settings.smooth_l1_beta) == ("p5", (1.0,) * 4, 0.0)
    assert settings.freeze_bn and settings.freeze_at == 2 and settings.num_classes == 5
    assert (settings.min_size, settings.max_size) == (96, 96)
    # Resume with the same command: the checkpoint's model (P6 from P5, frozen) and optimizer state load.
    assert train.main(csv_flags(data, output) + ["--resume", os.path.join(output, "last.pt"), "--iters", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = read_checkpoint(os.path.join(output, "last.pt"))
    assert resumed["iteration"] == 2 and checkpoint_settings(resumed) == settings
    model, _ = load_model(os.path.join(output, "last.pt"))
    assert not model.backbone.layer1[0].conv1.weight.requires_grad and not model.backbone.bn1.training
    argv = ["--csv_val", os.path.join(data, "val.csv"), "--classes", os.path.join(data, "classes.csv"),
            "--model", os.path.join(output, "last.pt"), "--device", "cpu"]
    assert csv_eval.main(argv) == 0
    assert "mAP: " in capsys.readouterr().out


def test_resume_keeps_the_checkpoints_recipe_and_names_a_contradicting_flag(trained_shapes_run, tmp_path):
    flags = tiny_run_flags(tmp_path, "--iters", "4", "--resume", trained_shapes_run.checkpoint)
    with pytest.raises(ValueError, match=r"trained with box_loss smooth_l1 \(asked for: giou\).*--fine_tune"):
        train.main(flags + ["--box_loss", "giou"])
    with pytest.raises(ValueError, match=r"min_size 96 \(asked for: 128\)"):
        train.main(flags + ["--min_size", "128"])


def test_fine_tuning_keeps_a_recipe_that_fixes_shapes_and_refuses_to_change_it(converted_torchvision):
    checkpoint = read_checkpoint(converted_torchvision)
    with pytest.raises(ValueError, match=r"fix depth 50 \(not 18\)"):
        load_model(checkpoint, num_classes=2, depth=18)
    with pytest.raises(ValueError, match="num_anchors"):
        load_model(checkpoint, num_classes=2, anchor_ratios=(1.0,))
    tuned = load_model(checkpoint, num_classes=2, min_size=512, box_loss="giou").model
    assert (tuned.settings.min_size, tuned.settings.box_loss, tuned.settings.p6_from) == (512, "giou", "p5")


def test_new_classes_start_from_the_prior_and_everything_else_from_the_checkpoint():
    torch.manual_seed(0)
    source = RetinaNet(ModelSettings(num_classes=3, depth=18))
    checkpoint = {"model": source.state_dict(), "model_settings": source.settings.as_dict()}
    tuned, class_names = load_model(checkpoint, num_classes=7)
    assert class_names == ["0", "1", "2", "3", "4", "5", "6"]  # the new classes are not named yet
    bias = tuned.classification_subnet.output.bias
    assert bias.shape == (9 * 7,)
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.01))  # π = 0.01
    torch.testing.assert_close(tuned.box_subnet.output.weight, source.box_subnet.output.weight)
    torch.testing.assert_close(tuned.classification_subnet.conv4.weight, source.classification_subnet.conv4.weight)

