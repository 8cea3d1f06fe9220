import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_run_flags

import train

from retinanet.checkpoint import build_model, load_model, read_checkpoint, save_checkpoint
from retinanet.data.shapes import make_shapes_dataset
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings, resolve_device
from retinanet.training import ADAMW_LR, Schedule, build_optimizer, plan_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lr_schedule_warmup_steps_and_cosine():
    steps = Schedule(total_iters=90, iters_per_epoch=10, warmup_iters=10, milestones=(60, 80))
    assert steps.lr_factor(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert steps.lr_factor(9) == pytest.approx(1.0)
    assert steps.lr_factor(59) == pytest.approx(1.0)
    assert steps.lr_factor(60) == pytest.approx(0.1)
    assert steps.lr_factor(80) == pytest.approx(0.01)
    assert Schedule(90, 10, 0, (), lr_schedule="cosine").lr_factor(45) == pytest.approx(0.5)


def test_default_milestones_are_the_papers_60k_and_80k_of_90k():
    schedule = plan_schedule(7330, epochs=None, iters=90_000, warmup_iters=0, shorten_warmup=False, milestones=None)
    assert schedule.milestones == (60_000, 80_000)
    assert schedule.lr_factor(59_999) == 1.0
    assert schedule.lr_factor(60_000) == pytest.approx(0.1)
    assert schedule.lr_factor(80_000) == pytest.approx(0.01)


def test_dataset_defaults_and_linear_lr_scaling():
    args = train.parse_args(["--dataset", "coco", "--coco_path", "x", "--batch_size", "8"])
    run, source = train.decide(args, checkpoint=None, world_size=4)
    assert (run.settings["depth"], run.optimizer, run.iters) == (50, "sgd", 90_000)
    settings = ModelSettings(**run.settings, num_classes=80)
    assert (settings.depth, settings.min_size, settings.max_size) == (50, 800, 1333)  # the paper's image size
    assert run.lr == pytest.approx(0.02)  # 0.01 x (8 x 4) / 16
    assert (source["lr"], source["depth"], source["batch_size"]) == ("sgd's for 32 images", "coco default", "typed")
    assert args.lr is None and args.depth is None  # the flags as typed: deciding writes nothing back
    demo, _ = train.decide(train.parse_args([]), None, world_size=1)
    assert (demo.dataset, demo.settings["depth"], demo.optimizer, demo.pretrained) == ("shapes", 18, "adamw", False)


def test_a_typed_epochs_wins_over_the_datasets_default_iterations():
    run, _ = train.decide(train.parse_args(["--dataset", "coco", "--coco_path", "x", "--epochs", "1"]), None, 1)
    assert (run.epochs, run.iters) == (1, None)
    run, _ = train.decide(train.parse_args(["--dataset", "coco", "--coco_path", "x", "--epochs", "1", "--iters", "7"]),
                          None, 1)
    assert run.iters == 7  # both typed: --iters wins, as --help says
    assert train.decide(train.parse_args(["--dataset", "coco", "--coco_path", "x"]), None, 1)[0].iters == 90_000


def schedule_of(argv: list[str], iters_per_epoch: int) -> Schedule:
    run, _ = train.decide(train.parse_args(argv), None, world_size=1)
    return plan_schedule(iters_per_epoch, run.epochs, run.iters, run.warmup_iters, run.shorten_warmup, run.milestones,
                         run.lr_schedule, run.lr_step_factor, run.eval_every)


def test_a_default_warmup_takes_at_most_a_tenth_of_the_run_and_a_typed_one_is_kept():
    csv = ["--dataset", "csv", "--csv_train", "x", "--classes", "y"]
    # 36 images in batches of 4, 400 iterations: 40 of warmup, not the recipe's 500; 45 epochs, reported every 2
    short = schedule_of([*csv, "--iters", "400"], iters_per_epoch=9)
    assert (short.warmup_iters, short.milestones, short.epochs, short.eval_every, short.save_every) == (
        40, (266, 355), 45, 2, 2)
    assert schedule_of([*csv, "--iters", "400", "--warmup_iters", "500"], 9).warmup_iters == 500
    assert schedule_of([*csv, "--iters", "400", "--eval_every", "5"], 9).eval_every == 5
    coco = schedule_of(["--dataset", "coco", "--coco_path", "x"], iters_per_epoch=7330)
    assert (coco.total_iters, coco.warmup_iters, coco.milestones, coco.eval_every) == (90_000, 500, (60_000, 80_000), 1)
    assert schedule_of([], iters_per_epoch=188).warmup_iters == 112  # the demo: 6 epochs of 188


def test_a_short_run_reaches_its_lr_and_says_its_schedule_first(tmp_path, capsys):
    # 12 images in batches of 4: 3 iterations an epoch, 30 iterations, a default warmup (3 iterations, not 200)
    flags = tiny_run_flags(tmp_path, "--iters", "30", "--lr", "0.0002")
    warmup = flags.index("--warmup_iters")
    assert train.main(flags[:warmup] + flags[warmup + 2:]) == 0
    out = capsys.readouterr().out
    assert ("schedule: 30 iterations (10 epochs of 3), lr 0.0002 after a linear warmup of 3 iterations, multiplied "
            "by 0.1 at iterations 20 and 26; no validation, last.pt every 1 epoch(s)") in out
    epoch_lrs = [line.rsplit(", lr ", 1)[1].split(",")[0] for line in out.splitlines() if line.startswith("epoch ")]
    assert epoch_lrs == ["0.0002"] * 6 + ["2e-05"] * 2 + ["2e-06"] * 2  # after iterations 3, 6, ..., 30
    assert "warning" not in out


def test_a_typed_warmup_longer_than_the_run_is_warned_of_and_the_run_goes_on(tmp_path, capsys):
    flags = tiny_run_flags(tmp_path, "--iters", "6")
    flags[flags.index("--warmup_iters") + 1] = "100"
    assert train.main(flags) == 0
    assert ("warning: the warmup of 100 iterations is longer than the run (6 iterations, lr steps at 4, 5): the lr "
            "never reaches 0.0003, at most 1.2e-05; training goes on") in capsys.readouterr().out
    assert read_checkpoint(str(tmp_path / "out" / "last.pt"))["iteration"] == 6


def test_focal_gamma_and_alpha_train_resume_and_load_with_the_checkpoint(tmp_path):
    # Table 1a's α-balanced cross entropy: γ = 0, α = 0.75
    assert train.main(tiny_run_flags(tmp_path, "--iters", "1", "--focal_gamma", "0", "--focal_alpha", "0.75")) == 0
    last = str(tmp_path / "out" / "last.pt")
    assert read_checkpoint(last)["model_settings"]["focal_gamma"] == 0.0
    assert train.main(tiny_run_flags(tmp_path, "--iters", "2", "--resume", last)) == 0
    with pytest.raises(ValueError, match=r"focal_gamma 0.0 \(asked for: 2.0\)"):
        train.main(tiny_run_flags(tmp_path, "--iters", "3", "--resume", last, "--focal_gamma", "2"))
    loaded = load_model(last).model
    assert (loaded.settings.focal_gamma, loaded.settings.focal_alpha) == (0.0, 0.75)
    with pytest.raises(ValueError, match="focal_gamma must be >= 0"):
        train.main(tiny_run_flags(tmp_path, "--iters", "1", "--focal_gamma", "-1"))

def test_no_weight_decay_on_biases_and_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = build_optimizer(model, "sgd", lr=0.1).param_groups
    assert decay["weight_decay"] == 1e-4 and [p.ndim for p in decay["params"]] == [4]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "csv"], "--csv_train"),
    (["--dataset", "coco"], "--coco_path"),
    (["--resume", "a.pt", "--fine_tune", "b.pt"], "exclude"),
    (["--jitter", "800", "600"], "MIN <= MAX"),
])
def test_contradictory_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_writes_a_checkpoint_and_resume_continues(tmp_path, capsys):
    assert train.main(tiny_run_flags(tmp_path, "--iters", "2")) == 0
    first = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert first["iteration"] == 2 and first["class_names"] == ["circle", "rectangle", "triangle", "ellipse", "star"]
    assert set(first) >= {"model", "optimizer", "scheduler", "scaler", "model_settings", "args", "epoch"}
    # the demo ends by drawing its detections next to the ground truth on the 4 validation images
    assert sorted(os.listdir(tmp_path / "out" / "detections")) == [f"{i:05d}.png" for i in range(4)]

    assert train.main(tiny_run_flags(tmp_path, "--iters", "5", "--resume", str(tmp_path / "out" / "last.pt"))) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert resumed["iteration"] == 5
    # lr after 5 scheduler steps with 3 warmup iterations and default milestones at 2/3 and 8/9 of 5: 3 and 4
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(ADAMW_LR * 0.1 * 0.1)


def test_fine_tune_to_a_different_class_count(tmp_path):
    assert train.main(tiny_run_flags(tmp_path, "--iters", "1")) == 0
    source = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    classes = tmp_path / "two_classes.csv"
    classes.write_text("circle,0\nrectangle,1\n")
    annotations = tmp_path / "two.csv"
    lines = (tmp_path / "shapes" / "train.csv").read_text().splitlines()
    kept = [line for line in lines if line.endswith((",circle", ",rectangle")) or line.endswith(",,,,,")]
    annotations.write_text("\n".join(line.replace("images/", str(tmp_path / "shapes" / "images") + "/", 1) for line in kept) + "\n")
    flags = ["--dataset", "csv", "--csv_train", str(annotations), "--classes", str(classes),
             "--fine_tune", str(tmp_path / "out" / "last.pt"), "--iters", "1", "--depth", "18", "--no_pretrained",
             "--output_dir", str(tmp_path / "tuned"), "--batch_size", "4", "--min_size", "96", "--max_size", "96",
             "--workers", "0", "--eval_every", "0"]
    assert train.main(flags) == 0
    tuned = read_checkpoint(str(tmp_path / "tuned" / "last.pt"))
    assert tuned["model"]["classification_subnet.output.weight"].shape[0] == 9 * 2
    assert tuned["class_names"] == ["circle", "rectangle"]
    # Only the classification output was re-initialised: the rest started from the source.
    assert tuned["model"]["fpn.p6.weight"].shape == source["model"]["fpn.p6.weight"].shape


def test_bad_csv_ends_with_a_message_and_status_2(tmp_path):
    classes = tmp_path / "classes.csv"
    classes.write_text("cat,0\n")
    annotations = tmp_path / "train.csv"
    annotations.write_text("img.png,1,2,oops,4,cat\n")
    result = subprocess.run(
        [sys.executable, "train.py", "--dataset", "csv", "--csv_train", str(annotations), "--classes",
         str(classes), "--no_pretrained"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.csv" in result.stderr and "line 1" in result.stderr


@pytest.mark.slow
def test_two_process_gloo_torchrun_smoke(tmp_path):
    # The moving-average normaliser all-reduces the foreground count over the processes.
    flags = tiny_run_flags(tmp_path, "--iters", "2", "--device", "cpu", "--loss_normalizer", "ema")
    # Generate the data once before the two ranks start, so they do not race to write it.
    make_shapes_dataset(str(tmp_path / "shapes"), "train", 12, seed=0)
    make_shapes_dataset(str(tmp_path / "shapes"), "val", 4, seed=1)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "train.py", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(str(tmp_path / "out" / "last.pt"))["iteration"] == 2


@pytest.mark.slow
def test_the_demo_learns(tmp_path):
    # The demo's recipe (ResNet-18 from scratch, AdamW, 160-pixel images) on 800 images instead of 1,500, for 5
    # epochs instead of 6: 500 iterations, 5.5 minutes on 2 CPU cores (AMD EPYC, bf16). Measured: mAP@0.5 0.56 on 100
    # validation images (0.58 after 6 epochs), where an untrained model scores 0; the threshold leaves room for
    # other CPUs' arithmetic (fp32 without bf16).
    flags = ["--data_dir", str(tmp_path / "shapes"), "--output_dir", str(tmp_path / "out"), "--shapes_train", "800",
             "--shapes_val", "100", "--epochs", "5", "--eval_every", "5"]
    assert train.main(flags) == 0
    assert read_checkpoint(str(tmp_path / "out" / "best.pt"))["best_map"] > 0.4


def model_for_flags(argv: list[str], num_classes: int):
    """train.py's model for these flags, as its main builds it."""
    args = train.parse_args(argv)
    checkpoint = read_checkpoint(args.resume or args.fine_tune) if args.resume or args.fine_tune else None
    run, _ = train.decide(args, checkpoint, world_size=1)
    if args.fine_tune:
        return load_model(checkpoint, num_classes=num_classes, **run.settings).model
    return build_model(ModelSettings(**run.settings, num_classes=num_classes), False if args.resume else run.pretrained)


def test_resume_rebuilds_a_pretrained_run_frozen_as_it_was_without_fetching_imagenet_weights(monkeypatch, tmp_path):
    def no_download(*args):
        raise AssertionError("resuming must not fetch ImageNet weights: the checkpoint replaces them")

    monkeypatch.setattr("retinanet.checkpoint.imagenet_state_dict", no_download)
    # as a run from ImageNet weights
    pretrained_run = RetinaNet(ModelSettings(num_classes=3, depth=18, freeze_bn=True, freeze_at=2))
    save_checkpoint({"model": pretrained_run.state_dict(), "model_settings": pretrained_run.settings.as_dict()},
                    str(tmp_path / "last.pt"))
    model = model_for_flags(["--dataset", "csv", "--csv_train", "t.csv", "--classes", "c.csv", "--depth", "18",
                         "--resume", str(tmp_path / "last.pt")], num_classes=3)  # the CSV default: pretrained
    assert model.settings.freeze_bn  # as the pretrained run it resumes
    assert not model.backbone.layer1[0].conv1.weight.requires_grad and model.backbone.layer2[0].conv1.weight.requires_grad


def test_fine_tuning_freezes_batchnorm_and_the_first_stage_as_for_pretrained_weights(tmp_path):
    path = tmp_path / "source.pt"
    torch.save(RetinaNet(ModelSettings(num_classes=5, depth=18)).state_dict(), path)
    flags = ["--dataset", "csv", "--csv_train", "t.csv", "--classes", "c.csv", "--fine_tune", str(path)]
    model = model_for_flags(flags, num_classes=2)
    assert model.num_classes == 2 and model.settings.freeze_bn
    assert not model.backbone.conv1.weight.requires_grad and not model.backbone.layer1[1].conv2.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    assert model_for_flags(flags + ["--freeze_at", "0"], num_classes=2).backbone.conv1.weight.requires_grad


def test_an_unusable_device_is_a_message_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--device", "tpu9", "--data_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown device 'tpu9'; expected cpu, cuda or cuda:N" in result.stderr


def test_the_default_device_sets_cudnn_benchmark_as_a_named_one_does(monkeypatch):
    # Start from the wrong value: True without a GPU, False with one; the default device must set it either way.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not torch.cuda.is_available())
    device = resolve_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.backends.cudnn.benchmark == (device.type == "cuda")


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # 4 iterations, 3 per epoch, with scale jitter, flips and augmentations; the same lr schedule whatever the run's
    # length.
    schedule = ["--jitter", "64", "96", "--warmup_iters", "2", "--milestones", "3", "--loss_normalizer", "ema",
                "--augment", "photometric", "zoom_out", "crop", "rot90", "vflip"]
    assert train.main(tiny_run_flags(tmp_path / "straight", "--iters", "4", *schedule)) == 0
    # Stopped at iteration 2, mid-epoch, then resumed with a data loading process instead of none.
    assert train.main(tiny_run_flags(tmp_path / "stopped", "--iters", "2", *schedule)) == 0
    last = str(tmp_path / "stopped" / "out" / "last.pt")
    assert train.main(tiny_run_flags(tmp_path / "stopped", "--iters", "4", *schedule, "--resume", last,
                                     "--workers", "1")) == 0
    expected = read_checkpoint(str(tmp_path / "straight" / "out" / "last.pt"))
    found = read_checkpoint(last)
    assert found["iteration"] == expected["iteration"] == 4
    assert all(torch.equal(found["model"][key], value) for key, value in expected["model"].items())
    assert found["loss_normalizer_ema"] == expected["loss_normalizer_ema"] != 100.0  # the EMA went on too


@pytest.mark.slow
def test_evaluation_shared_by_two_processes_gives_the_map_of_one(tmp_path):
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=5, depth=18, min_size=96, max_size=96))
    with torch.no_grad():
        model.classification_subnet.output.bias.fill_(-2.0)  # many detections, some on the shapes: mAP > 0
    checkpoint = str(tmp_path / "model.pt")
    class_names = ["circle", "rectangle", "triangle", "ellipse", "star"]
    save_checkpoint({"model": model.state_dict(), "model_settings": model.settings.as_dict(),
                     "class_names": class_names}, checkpoint)
    data = make_shapes_dataset(str(tmp_path / "shapes"), "val", 7, image_size=96, seed=3)  # 4 batches of 2
    script = [os.path.join(ROOT, "tests", "distributed_evaluation.py"), checkpoint, data["csv"], data["classes"]]
    found = {}
    for processes in (1, 2):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                 "--master_port=29533", *script], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
        assert result.returncode == 0, result.stderr[-3000:]
        found[processes] = float(result.stdout.split("evaluated mAP ")[1].split()[0])
    assert found[1] > 0 and found[2] == found[1]
