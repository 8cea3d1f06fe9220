"""Train a RetinaNet on the built-in shapes demo, a CSV-annotated dataset, COCO or Pascal VOC (paper §4.1
"Optimization").

    python train.py                                   # shapes demo: ResNet-18 from scratch on the CPU, minutes
    python train.py --dataset csv --csv_train train.csv --csv_classes classes.csv --csv_val val.csv
    python train.py --dataset coco --coco_path /data/coco --depth 50
    python train.py --dataset voc --voc_path VOCdevkit/VOC2007 VOCdevkit/VOC2012 --augment photometric crop
    torchrun --nproc_per_node=8 train.py --dataset coco --coco_path /data/coco   # one process per GPU

Read top to bottom: the flags; every value of the run settled once from the flags, the dataset's defaults and
(on --resume or --fine_tune) the checkpoint; then data, model, optimizer and schedule; then the loop.
"""

import argparse
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from retinanet.data.augmentations import AUGMENTATIONS, Augmentation
from retinanet.data.datasets import CocoDataset, CSVDataset, VOCDataset
from retinanet.data.shapes import make_shapes_demo
from retinanet.data.voc import VOCSet, read_voc_set, run_class_names, training_sets
from retinanet.dataloader import DetectionDataset, training_loader
from retinanet.diagnostics.check import check_anchors, check_data
from retinanet.engine.batch_inference import gather_predictions, predict_dataset
from retinanet.engine.checkpoint import (checkpoint_settings, read_checkpoint, restore_training_state, resumed_settings,
                                         save_checkpoint, training_state)
from retinanet.engine.coco_evaluation import evaluate_coco
from retinanet.engine.drawing import visualize_dataset
from retinanet.engine.evaluation import evaluate
from retinanet.engine.flags import ANCHOR_FLAGS, CSV_FLAGS, given, run_script
from retinanet.engine.models import WeightsUnavailableError, build_model, load_model
from retinanet.engine.runtime import (StopRequest, default_workers, mixed_precision_dtype, setup_distributed,
                                      stop_on_signals)
from retinanet.model import RetinaNet
from retinanet.optimization import build_optimizer, default_lr, default_milestones, default_warmup, lr_factor
from retinanet.settings import BOX_CODINGS, BOX_LOSSES, LOSS_NORMALIZERS, RESNET_BLOCKS, ModelSettings, initial_freezing
from retinanet.training import TrainStep
from retinanet.transforms import build_transform

# Per-dataset defaults of the flags left unset (the model settings' own defaults, the paper's, for the others). The
# demo trains a small network from scratch on small images, with AdamW and yhenon's box coding (README, "The demo").
# COCO follows the paper (ResNet-50, SGD, 90k iterations at 16 images). VOC trains about as long as detectron2's VOC
# recipe: 18k iterations of 16 images over VOC2007 + 2012 trainval's 16,551 images are 17.4 epochs.
DEFAULTS = {
    "shapes": dict(depth=18, optimizer="adamw", batch_size=8, min_size=160, max_size=160, epochs=6,
                   warmup_iters=200, pretrained=False, box_coding="yhenon"),
    "csv": dict(depth=50, optimizer="sgd", batch_size=8, epochs=20, warmup_iters=500, pretrained=True),
    "coco": dict(depth=50, optimizer="sgd", batch_size=16, iters=90_000, warmup_iters=500, pretrained=True,
                 train_set="train2017", val_set="val2017"),
    "voc": dict(depth=50, optimizer="sgd", batch_size=8, epochs=18, warmup_iters=500, pretrained=True,
                train_set="trainval", val_set="test"),
}
# The flags that are model settings (settings.py): flag -> setting; --box_coding and --pretrained set others.
SETTINGS_FLAGS = {name: name for name in ("depth", "min_size", "max_size", "freeze_at", "box_loss", "loss_normalizer",
                                          "anchor_sizes", "anchor_scales", "anchor_ratios")}
SETTINGS_FLAGS |= {"focal_gamma": "gamma", "focal_alpha": "alpha"}
DATASET_FLAGS = {"csv": ("csv_train", "csv_classes"), "coco": ("coco_path",), "voc": ("voc_path",)}
REPORTS_PER_RUN = 20  # a run of many short epochs evaluates and saves last.pt about this many times, not every epoch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_data_arguments(parser.add_argument_group("data"))
    add_model_arguments(parser.add_argument_group("model (saved in checkpoints; on --resume, the checkpoint's)"))
    add_optimization_arguments(parser.add_argument_group("optimization"))
    add_run_arguments(parser.add_argument_group("run"))
    args = parser.parse_args(argv)
    needed = DATASET_FLAGS.get(args.dataset, ())
    if not all(getattr(args, flag) for flag in needed):
        parser.error(f"--dataset {args.dataset} needs " + " and ".join(f"--{flag}" for flag in needed))
    if args.resume and args.fine_tune:
        parser.error("--resume and --fine_tune exclude each other: resume continues a run, fine_tune starts a new one")
    if args.jitter and args.jitter[0] > args.jitter[1]:
        parser.error(f"--jitter MIN MAX needs MIN <= MAX, got {args.jitter}")
    return args


def add_data_arguments(data) -> None:
    data.add_argument("--dataset", choices=("shapes", "csv", "coco", "voc"), default="shapes", help="which data to train on (default: the built-in shapes demo)")
    data.add_argument("--coco_path", help="COCO root holding annotations/instances_{set}.json and images/{set}/")
    data.add_argument("--voc_path", nargs="+", metavar="ROOT", help="Pascal VOC roots (Annotations/, JPEGImages/, ImageSets/Main/{set}.txt), or folders of VOC XML files next to their images")
    data.add_argument("--voc_val", nargs="+", metavar="ROOT", help="VOC validation data (default: --val_set of the --voc_path roots that list it)")
    data.add_argument("--train_set", help="training set name (COCO: train2017, VOC: trainval)")
    data.add_argument("--val_set", help="validation set name (COCO: val2017, VOC: test)")
    data.add_argument("--csv_train", help="CSV annotations for training: path,x1,y1,x2,y2,class_name")
    data.add_argument("--csv_classes", help="CSV class list: class_name,id (VOC: optional, default the 20 VOC classes or the names found)")
    data.add_argument("--csv_val", help="CSV annotations for validation (optional)")
    for name, options in CSV_FLAGS:
        data.add_argument(name, **options)
    data.add_argument("--data_dir", default="data/shapes", help="where the shapes demo data is generated")
    data.add_argument("--shapes_train", type=int, default=1500, help="number of shapes training images")
    data.add_argument("--shapes_val", type=int, default=200, help="number of shapes validation images")
    data.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="multi-scale training: shorter side drawn from MIN..MAX")
    data.add_argument("--augment", nargs="+", choices=AUGMENTATIONS, default=[], metavar="NAME", help=f"augmentations beyond the paper's flips: {', '.join(AUGMENTATIONS)}")
    data.add_argument("--workers", type=int, help="data loading processes per training process (default: the cores per process, at most 8)")


def add_model_arguments(model) -> None:
    model.add_argument("--depth", type=int, choices=tuple(RESNET_BLOCKS), help="ResNet depth")
    model.add_argument("--min_size", type=int, help="shorter image side after resizing (paper: 800)")
    model.add_argument("--max_size", type=int, help="longest image side after resizing (default 1333)")
    model.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH", help="start from ImageNet weights (torchvision's, or a local file)")
    model.add_argument("--no_pretrained", dest="pretrained", action="store_false", help="train the backbone from scratch (BatchNorm stays trainable)")
    model.add_argument("--freeze_at", type=int, choices=range(6), metavar="{0..5}", help="freeze the stem (1) and the first residual stages (2..5) (default: 2 with pretrained weights or --fine_tune, as detectron2; 0 from scratch)")
    model.add_argument("--box_coding", choices=tuple(BOX_CODINGS), help="box deltas' std and smooth L1 beta: detectron (default, the authors' code: 1, 0.11), detectron2, torchvision, yhenon (0.1/0.2, 1/9)")
    model.add_argument("--box_loss", choices=BOX_LOSSES, help="box regression loss (paper: smooth L1)")
    model.add_argument("--loss_normalizer", choices=LOSS_NORMALIZERS, help="divide losses by this batch's foreground count (paper) or its moving average")
    model.add_argument("--focal_gamma", type=float, help="the focal loss's γ, Eq. 4 (paper: 2; 0 is α-balanced cross entropy, Table 1a)")
    model.add_argument("--focal_alpha", type=float, help="the focal loss's α, Eq. 3 and 5 (paper: 0.25 with γ = 2, Table 1b; negative: no α-balancing)")
    for name, options in ANCHOR_FLAGS:
        model.add_argument(name, **options)


def add_optimization_arguments(optim) -> None:
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), help="SGD as in the paper; AdamW converges faster from scratch")
    optim.add_argument("--epochs", type=int, help="number of passes over the training set (a typed --epochs wins over the dataset's default --iters)")
    optim.add_argument("--iters", type=int, help="number of iterations (wins over --epochs when both are typed)")
    optim.add_argument("--batch_size", type=int, help="images per iteration per process")
    optim.add_argument("--lr", type=float, help="learning rate (default: 0.01 x total batch / 16 for SGD, 3e-4 for AdamW)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay, not applied to BatchNorm and biases (paper: 1e-4)")
    optim.add_argument("--warmup_iters", type=int, help="linear learning-rate warmup length (default: the dataset's, 500 iterations, 200 for shapes, or a tenth of a shorter run)")
    optim.add_argument("--lr_schedule", choices=("step", "cosine"), default="step", help="step: divide by --gamma at each milestone (paper); cosine")
    optim.add_argument("--milestones", type=int, nargs="+", help="iterations of the lr steps (default: 2/3 and 8/9 of training, as 60k and 80k of 90k)")
    optim.add_argument("--gamma", type=float, default=0.1, help="lr factor at each milestone (paper: 0.1)")
    optim.add_argument("--clip_grad", type=float, help="clip the gradient norm to this value (off by default)")


def add_run_arguments(run) -> None:
    run.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    run.add_argument("--full_precision", action="store_true", help="train in fp32 (default: mixed precision, fp16 on GPU, bf16 on CPUs with native bf16)")
    run.add_argument("--output_dir", default="output", help="where checkpoints go")
    run.add_argument("--resume", metavar="PATH", help="continue a run from its checkpoint (same model, iteration, lr, optimizer state, random state)")
    run.add_argument("--fine_tune", metavar="PATH", help="start from a checkpoint trained on other classes (new classification output)")
    run.add_argument("--eval_every", type=int, help=f"evaluate every N epochs (0: never; default: every epoch, or every few so that a run evaluates about {REPORTS_PER_RUN} times)")
    run.add_argument("--checkpoint_every", type=int, default=0, help="also save last.pt every N iterations (it is saved after each epoch, or after every few in a run of many)")
    run.add_argument("--logdir", help="write TensorBoard scalars here")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--skip_nonfinite", action="store_true", help="skip a batch whose loss is NaN or infinite (counted and reported) instead of stopping")
    run.add_argument("--check_data", action="store_true", help="read every annotation and image, list all problems, report how the anchors cover the training boxes, and exit (non-zero if training could not start)")
    run.add_argument("--fit_anchors", action="store_true", help="print the anchor scales and ratios (and image size) that cover most training boxes, and exit")


# ------------------------------------------------------------------------------------- settling the run


def settle(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """A new namespace with every value of the run decided: a flag left unset takes the dataset's default, the lr
    follows the optimizer and the total batch. `args` itself is left as parsed (it says what was typed)."""
    defaults = DEFAULTS[args.dataset]
    config = argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})
    if args.epochs is not None or args.iters is not None:  # a typed length wins over the dataset's default
        config.epochs, config.iters = args.epochs, args.iters
    config.workers = args.workers if args.workers is not None else default_workers()
    config.lr = args.lr if args.lr is not None else default_lr(config.optimizer, config.batch_size * world_size)
    config.warmup_typed = args.warmup_iters is not None  # a default warmup is shortened to fit a short run
    return config


class Schedule(NamedTuple):
    """The run's length, warmup, lr steps and cadence, decided once the epoch's length is known."""

    total_iters: int
    iters_per_epoch: int
    warmup_iters: int
    milestones: list[int]
    epochs: int  # the last one may stop short, at total_iters
    eval_every: int  # epochs between evaluations (0: never)
    save_every: int  # epochs between saves of last.pt


def plan_schedule(config: argparse.Namespace, iters_per_epoch: int) -> Schedule:
    """The schedule of a run of `config` whose epochs last `iters_per_epoch` iterations: --iters or --epochs long,
    a typed warmup as typed and a default one at most a tenth of the run, the lr steps at the typed milestones or
    the paper's 2/3 and 8/9, evaluation and last.pt every epoch, or every few epochs in a run of many."""
    total_iters = config.iters or config.epochs * iters_per_epoch
    warmup_iters = config.warmup_iters if config.warmup_typed else default_warmup(config.warmup_iters, total_iters)
    epochs = math.ceil(total_iters / iters_per_epoch)
    save_every = max(1, epochs // REPORTS_PER_RUN)
    eval_every = config.eval_every if config.eval_every is not None else save_every
    return Schedule(total_iters, iters_per_epoch, warmup_iters, config.milestones or default_milestones(total_iters),
                    epochs, eval_every, save_every)


def describe_schedule(schedule: Schedule, config: argparse.Namespace) -> str:
    """One line: length, warmup, the lr's course and the cadence of evaluation and checkpoints."""
    epochs = schedule.total_iters / schedule.iters_per_epoch
    if config.lr_schedule == "cosine":
        course = f"then a cosine decay to 0 at iteration {schedule.total_iters}"
    else:
        steps = " and ".join(str(milestone) for milestone in schedule.milestones)
        course = f"multiplied by {config.gamma:g} at iteration{'s' * (len(schedule.milestones) > 1)} {steps}"
    evaluation = f"validation every {schedule.eval_every} epoch(s)" if schedule.eval_every else "no validation"
    return (f"schedule: {schedule.total_iters} iterations ({epochs:.3g} epochs of {schedule.iters_per_epoch}), lr "
            f"{config.lr:g} after a linear warmup of {schedule.warmup_iters} iterations, {course}; {evaluation}, "
            f"last.pt every {schedule.save_every} epoch(s)")


def warmup_warning(schedule: Schedule, config: argparse.Namespace) -> str | None:
    """A warning if the lr never reaches --lr: the warmup outlasts the run, or its first lr step; None otherwise."""
    steps = schedule.milestones if config.lr_schedule == "step" else []
    first_step = min([schedule.total_iters, *steps])
    if schedule.warmup_iters <= first_step:
        return None
    factors = [lr_factor(iteration, schedule.total_iters, schedule.warmup_iters, config.lr_schedule,
                         schedule.milestones, config.gamma) for iteration in range(schedule.total_iters)]
    outlasts = "the run" if schedule.warmup_iters > schedule.total_iters else "the run's first lr step"
    return (f"warning: the warmup of {schedule.warmup_iters} iterations is longer than {outlasts} "
            f"({schedule.total_iters} iterations, lr steps at {', '.join(map(str, steps)) or 'none'}): the lr "
            f"never reaches {config.lr:g}, at most {config.lr * max(factors):.3g}; training goes on")


def flag_settings(flags: argparse.Namespace) -> dict:
    """The model settings that flags set: in parsed args, those the user typed; in a settled config, those and the
    dataset's defaults."""
    typed = given(**{setting: getattr(flags, flag) for flag, setting in SETTINGS_FLAGS.items()})
    found = {name: tuple(value) if isinstance(value, list) else value for name, value in typed.items()}  # nargs
    if flags.box_coding is not None:
        found["box_coder_std"], found["smooth_l1_beta"] = BOX_CODINGS[flags.box_coding]
    return found


def model_settings(args: argparse.Namespace, config: argparse.Namespace, checkpoint: dict | None,
                   num_classes: int) -> ModelSettings:
    """The settings of the model to train. On --resume, the checkpoint's (a typed flag that contradicts them is
    refused); on --fine_tune, the checkpoint's with the typed flags, frozen as with ImageNet weights unless
    --freeze_at says otherwise; for a new run, the paper's with the dataset's defaults and the typed flags. Weights
    that start trained get frozen BatchNorm and a frozen stem and first stage (settings.initial_freezing)."""
    if args.resume:
        return resumed_settings(checkpoint, args.resume, flag_settings(args), num_classes)
    if args.fine_tune:
        chosen = checkpoint_settings(checkpoint).as_dict() | initial_freezing(True) | flag_settings(args)
    else:
        chosen = initial_freezing(config.pretrained is not False) | flag_settings(config)
    return ModelSettings(**chosen | {"num_classes": num_classes})


def model_to_train(args: argparse.Namespace, config: argparse.Namespace, checkpoint: dict | None,
                   settings: ModelSettings) -> RetinaNet:
    """The checkpoint's model rebuilt exactly (--resume; restore_training_state loads its weights), the checkpoint's
    weights with a new classification output if the classes differ (--fine_tune), or a new model, its backbone from
    ImageNet weights or from scratch."""
    if args.fine_tune:
        return load_model(checkpoint, **settings.as_dict()).model
    return build_model(settings, False if args.resume else config.pretrained)


def build_datasets(config: argparse.Namespace, rank: int, world_size: int):
    """Training and validation datasets (validation may be None), their annotations read and checked; their images
    are resized once the model's size is known (set_transforms). The shapes demo data is generated by rank 0 while
    the other ranks wait, then read by all through the same CSV loader a user's data goes through."""
    if config.dataset == "coco":
        return CocoDataset(config.coco_path, config.train_set), CocoDataset(config.coco_path, config.val_set)
    if config.dataset == "voc":
        train_voc, val_voc = voc_sets(config)
        parsed = {voc_set: read_voc_set(voc_set) for voc_set in (train_voc, val_voc) if voc_set is not None}
        class_names = run_class_names(config.csv_classes, parsed.values())
        return (VOCDataset(*train_voc, class_names, parsed=parsed[train_voc]),
                VOCDataset(*val_voc, class_names, parsed=parsed[val_voc]) if val_voc else None)
    csv_train, csv_classes, csv_val = csv_files(config, rank, world_size)
    drop = config.drop_degenerate_boxes
    return (CSVDataset(csv_train, csv_classes, drop_degenerate=drop),
            CSVDataset(csv_val, csv_classes, drop_degenerate=drop) if csv_val else None)


def set_transforms(config: argparse.Namespace, settings: ModelSettings, train_set: DetectionDataset,
                   val_set: DetectionDataset | None) -> None:
    """Training images resized to the model's size (or the jitter range), flipped and augmented; validation images
    resized to the model's size."""
    jitter = tuple(config.jitter) if config.jitter else None
    augmentation = Augmentation(config.augment) if config.augment else None
    train_set.transform = build_transform(True, settings.min_size, settings.max_size, jitter, augmentation)
    if val_set is not None:
        val_set.transform = build_transform(False, settings.min_size, settings.max_size)


def voc_sets(config: argparse.Namespace) -> tuple[VOCSet, VOCSet | None]:
    """The VOC training set and the validation set (None if there is none) of the run."""
    return training_sets(config.voc_path, config.train_set, config.val_set, config.voc_val)


def csv_files(config: argparse.Namespace, rank: int, world_size: int) -> tuple[str, str, str | None]:
    """The training, class-list and validation CSV files: the user's, or the shapes demo's (generated once)."""
    if config.dataset != "shapes":
        return config.csv_train, config.csv_classes, config.csv_val
    if rank == 0:
        make_shapes_demo(config.data_dir, config.shapes_train, config.shapes_val, config.seed)
    if world_size > 1:
        dist.barrier()  # the others wait for the first to write it
    return make_shapes_demo(config.data_dir, config.shapes_train, config.shapes_val, config.seed)


def check_run_data(config: argparse.Namespace, rank: int, world_size: int) -> bool:
    """--check_data: read every annotation and image of the run's datasets and list each problem; False on any."""
    coco = (config.coco_path, [config.train_set, config.val_set]) if config.dataset == "coco" else None
    voc = voc_sets(config) if config.dataset == "voc" else None
    csv_train, csv_classes, csv_val = csv_files(config, rank, world_size) if coco is None else (None, None, None)
    csv_sets = [path for path in (csv_train, csv_val) if path]
    return check_data(coco, csv_sets, csv_classes, config.workers, voc)


# ------------------------------------------------------------------------------------------------ the loop


class Trainer:
    """The training state and loop: model, optimizer, schedule, mixed precision, checkpoints, evaluation."""

    def __init__(self, config, model, train_set, val_set, device: torch.device, rank: int, world_size: int):
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.model, self.train_set, self.val_set = model.to(device), train_set, val_set
        self.sampler, self.loader = training_loader(train_set, config.batch_size, config.workers, config.seed, rank,
                                                    world_size, pin_memory=device.type == "cuda")
        self.schedule = plan_schedule(config, len(self.sampler))
        self.iters_per_epoch, self.total_iters = self.schedule.iters_per_epoch, self.schedule.total_iters
        self.optimizer = build_optimizer(self.model, config.optimizer, config.lr, config.momentum, config.weight_decay)
        lr_course = dict(total_iters=self.total_iters, warmup_iters=self.schedule.warmup_iters,
                         schedule=config.lr_schedule, milestones=self.schedule.milestones, gamma=config.gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, **lr_course))
        self.amp_dtype = None if config.full_precision else mixed_precision_dtype(device)
        # fp16 needs its loss scaled so that small gradients do not underflow; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best_map, self.skipped_batches = 0, -1.0, 0
        self.stop = StopRequest()  # set by Ctrl-C or SIGTERM, at any moment
        self.stopping = False  # a stop all processes agreed on, at the end of a step
        ddp_model = DistributedDataParallel(self.model) if world_size > 1 else self.model
        self.step = TrainStep(ddp_model, self.optimizer, self.scaler, device, self.amp_dtype, config.clip_grad)
        self.writer = None
        if config.logdir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logdir)

    def save(self, name: str) -> str:
        path = os.path.join(self.config.output_dir, name)
        if self.rank == 0:
            os.makedirs(self.config.output_dir, exist_ok=True)
            save_checkpoint(training_state(
                self.model, self.optimizer, self.scheduler, self.scaler, class_names=list(self.train_set.class_names),
                epoch=self.iteration // self.iters_per_epoch, iteration=self.iteration, best_map=self.best_map,
                skipped_batches=self.skipped_batches, args=vars(self.config)), path)
        return path

    def restore(self, checkpoint: dict, path: str) -> None:
        """Continue the run of `checkpoint`, whose model this trainer's model was rebuilt from."""
        restore_training_state(checkpoint, path, self.model, self.optimizer, self.scheduler, self.scaler)
        self.iteration, self.best_map = checkpoint["iteration"], checkpoint["best_map"]
        self.skipped_batches = checkpoint["skipped_batches"]
        self.log(f"resumed from {path} at iteration {self.iteration}, lr {self.lr():.3g}")

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def log(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step (retinanet.training); returns the losses, NaN for a skipped batch."""
        images = batch["images"].to(self.device, non_blocking=True, memory_format=torch.channels_last)  # as the weights
        annotations = batch["annotations"].to(self.device, non_blocking=True)
        result = self.step(images, annotations, self.stop.requested)
        self.stopping = result.stop
        if result.nonfinite:
            self.skip_nonfinite(result.classification_loss, result.regression_loss)
        self.scheduler.step()
        self.iteration += 1  # counts skipped batches too: a resumed run starts after the last batch seen
        return (math.nan, math.nan) if result.nonfinite else (result.classification_loss, result.regression_loss)

    def skip_nonfinite(self, cls_value: float, box_value: float) -> None:
        """Count a batch whose loss is not finite, or stop the run with a message if --skip_nonfinite is off."""
        where = f"at iteration {self.iteration} (lr {self.lr():.3g}, classification {cls_value}, regression {box_value})"
        if not self.config.skip_nonfinite:
            raise SystemExit(
                f"error: the loss is not finite {where}. Try a lower --lr, a longer --warmup_iters or --clip_grad 10, "
                f"or --skip_nonfinite to skip such batches; {self.config.output_dir}/last.pt holds the last checkpoint."
            )
        self.skipped_batches += 1
        self.log(f"skipped a batch: the loss is not finite {where}; {self.skipped_batches} skipped so far")

    def train_epoch(self, epoch: int) -> None:
        self.model.train()
        start_batch = self.iteration - epoch * self.iters_per_epoch  # a resumed run skips what it trained on
        self.sampler.set_epoch(epoch, start_batch)
        progress = tqdm(self.loader, desc=f"epoch {epoch + 1}", total=self.iters_per_epoch - start_batch,
                        disable=self.rank != 0, leave=False)
        start, images_seen, speed, losses = time.perf_counter(), 0, 0.0, []
        for batch in progress:
            cls_loss, box_loss = self.train_step(batch)
            if math.isfinite(cls_loss + box_loss):
                losses.append((cls_loss, box_loss))
            images_seen += len(batch["indices"]) * self.world_size
            speed = images_seen / (time.perf_counter() - start)
            progress.set_postfix(cls=f"{cls_loss:.3f}", box=f"{box_loss:.3f}", lr=f"{self.lr():.2g}", img_s=f"{speed:.1f}")
            self.scalars({"loss/classification": cls_loss, "loss/regression": box_loss, "lr": self.lr()})
            if self.config.checkpoint_every and self.iteration % self.config.checkpoint_every == 0:
                self.save("last.pt")
            if self.iteration >= self.total_iters or self.stopping:
                break
        mean_cls, mean_box = np.mean(losses, axis=0) if losses else (math.nan, math.nan)
        skipped = f", {self.skipped_batches} batches skipped so far (non-finite loss)" if self.skipped_batches else ""
        self.log(f"epoch {epoch + 1}: iteration {self.iteration}/{self.total_iters}, mean classification loss "
                 f"{mean_cls:.4f}, mean regression loss {mean_box:.4f}, lr {self.lr():.3g}, {speed:.1f} images/s{skipped}")

    def scalars(self, values: dict) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, self.iteration)

    def evaluate(self) -> float | None:
        """Validation mAP@0.5 (VOC-style) for CSV and shapes data, COCO AP@[.5:.95] for COCO. Every process detects
        on its share of the images; the first gathers them and scores them (the others get None)."""
        if self.val_set is None:
            return None
        shard = predict_dataset(self.model.eval(), self.val_set, batch_size=self.config.batch_size,
                                workers=self.config.workers, rank=self.rank, world_size=self.world_size)
        predictions = gather_predictions(shard, self.rank, self.world_size)
        if predictions is None:
            return None
        coco = self.config.dataset == "coco"
        score = (evaluate_coco(predictions, self.val_set, self.config.output_dir, self.config.val_set)[0] if coco
                 else evaluate(predictions, self.val_set)["mAP"])
        self.scalars({"val/mAP": score})
        return score

    def run(self) -> None:
        epochs, eval_every, save_every = self.schedule.epochs, self.schedule.eval_every, self.schedule.save_every
        for epoch in range(self.iteration // self.iters_per_epoch, epochs):
            self.train_epoch(epoch)
            last = epoch + 1 == epochs
            if self.stopping or last or (epoch + 1) % save_every == 0:
                self.save("last.pt")
            if self.stopping:
                return
            if eval_every and ((epoch + 1) % eval_every == 0 or last):
                self.after_evaluation(self.evaluate())

    def after_evaluation(self, score: float | None) -> None:
        if score is None:
            return
        self.log(f"validation mAP {score:.4f}")
        if score > self.best_map:
            self.best_map = score
            self.log(f"new best model: {self.save('best.pt')}")


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world_size = setup_distributed(args.device)
    config = settle(args, world_size)
    if args.check_data and not check_run_data(config, rank, world_size):
        return 1
    torch.manual_seed(config.seed + rank)
    checkpoint = read_checkpoint(args.resume or args.fine_tune) if args.resume or args.fine_tune else None
    train_set, val_set = build_datasets(config, rank, world_size)
    settings = model_settings(args, config, checkpoint, train_set.num_classes)
    if args.check_data or args.fit_anchors:  # the anchors' coverage of the training boxes, at the training size
        check_anchors(train_set, settings, tuple(config.jitter) if config.jitter else None, args.fit_anchors)
        return 0
    set_transforms(config, settings, train_set, val_set)
    model = model_to_train(args, config, checkpoint, settings)
    if world_size > 1 and device.type == "cuda" and not model.settings.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the whole batch
    trainer = Trainer(config, model, train_set, val_set, device, rank, world_size)
    if args.resume:
        trainer.restore(checkpoint, args.resume)
    trainer.log(
        f"training a ResNet-{model.depth} RetinaNet on {len(train_set)} {config.dataset} images "
        f"({train_set.num_classes} classes) on {device} for {trainer.total_iters} iterations of "
        f"{config.batch_size * world_size} images, {config.optimizer} at lr {config.lr:g}, "
        f"{'mixed precision ' + str(trainer.amp_dtype).removeprefix('torch.') if trainer.amp_dtype else 'full precision'}"
    )
    trainer.log(describe_schedule(trainer.schedule, config))
    warning = warmup_warning(trainer.schedule, config)
    if warning:
        trainer.log(warning)
    with stop_on_signals(trainer.stop):
        trainer.run()
    if trainer.stopping:
        path = os.path.join(config.output_dir, "last.pt")
        trainer.log(f"stopped at iteration {trainer.iteration} and saved {path}; continue with --resume {path}")
        return 130
    trainer.log(f"done: checkpoints in {os.path.abspath(config.output_dir)}")
    if config.dataset == "shapes" and rank == 0:
        drawings = os.path.join(config.output_dir, "detections")
        paths = visualize_dataset(model.eval(), val_set, drawings)
        trainer.log("detections (right) next to the ground truth (left) on validation images:\n  " + "\n  ".join(paths))
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(run_script(main, sys.argv[1:], prog=None, errors=(ValueError, WeightsUnavailableError)))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without saving
        print("interrupted: stopped without saving; last.pt holds the last checkpoint", file=sys.stderr)
        sys.exit(130)
