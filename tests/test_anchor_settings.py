"""Anchor settings are model settings (§4 "Anchors"): a model with other anchors than the paper's 3 scales x 3
ratios trains, saves them in its checkpoint, resumes with them and is evaluated with them."""

from conftest import tiny_run_flags

import csv_eval
import train

from retinanet.checkpoint import load_model, read_checkpoint

SCALES = ("0.5", "0.75", "1", "1.5")
RATIOS = ("0.25", "0.5", "1", "2", "4")


def test_a_model_with_4_scales_and_5_ratios_trains_resumes_and_evaluates(tmp_path, capsys):
    anchors = ["--anchor_sizes", "16", "32", "64", "128", "256", "--anchor_scales", *SCALES, "--anchor_ratios", *RATIOS]
    assert train.main(tiny_run_flags(tmp_path, "--iters", "2", *anchors)) == 0
    last = str(tmp_path / "out" / "last.pt")
    saved = read_checkpoint(last)
    assert saved["model_settings"]["anchor_scales"] == (0.5, 0.75, 1.0, 1.5)
    assert saved["model_settings"]["anchor_ratios"] == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert saved["model"]["classification_subnet.output.weight"].shape[0] == 20 * 5  # A = 4 x 5 anchors, K = 5
    assert saved["model"]["box_subnet.output.weight"].shape[0] == 20 * 4

    # Resumed without the anchor flags: the checkpoint's anchors come back.
    assert train.main(tiny_run_flags(tmp_path, "--iters", "4", "--resume", last)) == 0
    resumed = read_checkpoint(last)
    assert resumed["iteration"] == 4 and resumed["model_settings"] == saved["model_settings"]
    model = load_model(last).model
    assert model.anchors.num_anchors == 20 and model.anchors.settings.anchor_sizes == (16, 32, 64, 128, 256)
    assert len(model.anchors.for_size(96, 96)) == 20 * sum(((96 + s - 1) // s) ** 2 for s in (8, 16, 32, 64, 128))

    # Fine-tuned from it: its anchors, and the weights of its 20-anchor subnets.
    tuned = tmp_path / "tuned"
    assert train.main(tiny_run_flags(tmp_path, "--iters", "1", "--fine_tune", last, "--output_dir", str(tuned))) == 0
    assert read_checkpoint(str(tuned / "last.pt"))["model_settings"]["anchor_ratios"] == (0.25, 0.5, 1.0, 2.0, 4.0)

    capsys.readouterr()
    data = tmp_path / "shapes"
    assert csv_eval.main(["--csv_val", str(data / "val.csv"), "--classes", str(data / "classes.csv"),
                          "--model", last, "--device", "cpu", "--workers", "0"]) == 0
    assert "mAP: " in capsys.readouterr().out


def test_resume_refuses_other_anchors_than_the_checkpoints(tmp_path, capsys):
    assert train.main(tiny_run_flags(tmp_path, "--iters", "1", "--anchor_scales", *SCALES)) == 0
    last = str(tmp_path / "out" / "last.pt")
    flags = tiny_run_flags(tmp_path, "--iters", "2", "--resume", last, "--anchor_scales", "1", "2")
    assert train.run_script(train.main, flags, "train.py") == 2
    assert "anchor_scales (0.5, 0.75, 1.0, 1.5) (asked for: (1.0, 2.0))" in capsys.readouterr().err
    assert read_checkpoint(last)["iteration"] == 1
    # The checkpoint's own anchors typed again are no contradiction.
    flags = tiny_run_flags(tmp_path, "--iters", "2", "--resume", last, "--anchor_scales", *SCALES)
    assert train.run_script(train.main, flags, "train.py") == 0
    assert read_checkpoint(last)["iteration"] == 2
