"""Train a RetinaNet on the built-in shapes demo, a CSV-annotated dataset, COCO or Pascal VOC (paper §4.1
"Optimization").

    python train.py                                   # shapes demo: ResNet-18 from scratch on the CPU, minutes
    python train.py --dataset csv --csv_train train.csv --classes classes.csv --csv_val val.csv
    python train.py --dataset coco --coco_path /data/coco --depth 50
    python train.py --dataset voc --voc_path VOCdevkit/VOC2007 VOCdevkit/VOC2012
    torchrun --nproc_per_node=8 train.py --dataset coco --coco_path /data/coco   # one process per GPU

Read top to bottom: the flags; `decide`, every value of the run, from the typed flags, the dataset's defaults and
(on --resume or --fine_tune) the checkpoint's recipe; then the data and the model; then `train`, the loop.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from retinanet.checkpoint import (build_model, checkpoint_settings, load_model, read_checkpoint,
                                  restore_training_state, resumed_settings, save_checkpoint, training_state)
from retinanet.data.augmentations import AUGMENTATIONS, Augmentation
from retinanet.data.coco import CocoDataset
from retinanet.data.shapes import make_shapes_demo, shapes_demo_files
from retinanet.data.voc import voc_datasets
from retinanet.dataloader import CSVDataset, build_transform, training_loader
from retinanet.evaluation import validation_score
from retinanet.settings import (ANCHOR_SETTINGS, BOX_CODINGS, ModelSettings, add_setting_flags, default_workers,
                                initial_freezing, run_script, typed_settings)
from retinanet.training import (StopRequest, TrainStep, build_optimizer, default_lr, mixed_precision_dtype,
                                nonfinite_loss, plan_schedule, scalar_writer, setup_distributed, stop_on_signals)

# The defaults of each dataset for the flags left out; the paper's settings (settings.py) for the others. The demo
# trains a small network from scratch on small images, with AdamW and yhenon's box coding (docs/demo.md). COCO
# follows the paper (ResNet-50, SGD, 90k iterations at 16 images). VOC trains about as long as detectron2's VOC
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
MODEL_SETTINGS = ("depth", "min_size", "max_size", "freeze_at", "box_loss", "loss_normalizer", "focal_gamma",
                  "focal_alpha", *ANCHOR_SETTINGS)  # the settings train.py's flags set, each named as its flag
DATASET_FLAGS = {"csv": ("csv_train", "classes"), "coco": ("coco_path",), "voc": ("voc_path",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("shapes", "csv", "coco", "voc"), default="shapes", help="which data to train on (default: the built-in shapes demo)")
    data.add_argument("--csv_train", metavar="CSV", help="CSV annotations to train on: path,x1,y1,x2,y2,class_name")
    data.add_argument("--csv_val", metavar="CSV", help="CSV annotations to validate on (optional)")
    data.add_argument("--classes", metavar="CSV", help="class list, rows class_name,id (CSV data; VOC: optional, default the 20 VOC classes or the names found)")
    data.add_argument("--drop_degenerate_boxes", action="store_true", help="leave out CSV boxes without area (x2 <= x1 or y2 <= y1), counted and named, instead of stopping")
    data.add_argument("--coco_path", metavar="ROOT", help="COCO root holding annotations/instances_{set}.json and images/{set}/")
    data.add_argument("--voc_path", nargs="+", metavar="ROOT", help="Pascal VOC roots (Annotations/, JPEGImages/, ImageSets/Main/{set}.txt), or folders of VOC XML files next to their images")
    data.add_argument("--voc_val", nargs="+", metavar="ROOT", help="VOC validation data (default: --val_set of the --voc_path roots that list it)")
    data.add_argument("--train_set", help="training set (COCO: train2017, VOC: trainval)")
    data.add_argument("--val_set", help="validation set (COCO: val2017, VOC: test)")
    data.add_argument("--data_dir", default="data/shapes", help="where the shapes demo data is generated")
    data.add_argument("--shapes_train", type=int, default=1500, help="number of shapes training images")
    data.add_argument("--shapes_val", type=int, default=200, help="number of shapes validation images")
    data.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="multi-scale training: shorter side drawn from MIN..MAX")
    data.add_argument("--augment", nargs="+", choices=AUGMENTATIONS, default=[], metavar="NAME", help=f"augmentations beyond the paper's flips: {', '.join(AUGMENTATIONS)} (docs/augmentation.md)")
    data.add_argument("--workers", type=int, help="data loading processes per training process (default: its share of the cores, at most 8)")
    model = parser.add_argument_group("model (saved in checkpoints; on --resume, the checkpoint's)")
    add_setting_flags(model, MODEL_SETTINGS)
    model.add_argument("--box_coding", choices=tuple(BOX_CODINGS), help="box deltas' std and smooth L1 beta: detectron (default, the authors' code: 1, 0.11), detectron2, torchvision, yhenon (0.1/0.2, 1/9)")
    model.add_argument("--pretrained", nargs="?", const=True, metavar="PATH", help="start from ImageNet weights (torchvision's, or a local file)")
    model.add_argument("--no_pretrained", dest="pretrained", action="store_false", help="train the backbone from scratch (BatchNorm stays trainable)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), help="SGD as in the paper; AdamW converges faster from scratch")
    optim.add_argument("--epochs", type=int, help="passes over the training set (a typed --epochs wins over the dataset's default --iters)")
    optim.add_argument("--iters", type=int, help="iterations (wins over --epochs when both are typed)")
    optim.add_argument("--batch_size", type=int, help="images per iteration per process")
    optim.add_argument("--lr", type=float, help="learning rate (default: 0.01 x total batch / 16 for SGD, 3e-4 for AdamW)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay, not of BatchNorm and biases (paper: 1e-4)")
    optim.add_argument("--warmup_iters", type=int, help="linear warmup (default: the dataset's, 500 iterations, 200 for shapes, or a tenth of a shorter run)")
    optim.add_argument("--lr_schedule", choices=("step", "cosine"), default="step", help="step: multiply by --lr_step_factor at each milestone (paper); cosine")
    optim.add_argument("--milestones", type=int, nargs="+", help="iterations of the lr steps (default: 2/3 and 8/9 of the run, as 60k and 80k of 90k)")
    optim.add_argument("--lr_step_factor", type=float, default=0.1, help="lr factor at each milestone (paper: 0.1)")
    optim.add_argument("--clip_grad", type=float, help="clip the gradient norm to this value (off by default)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    run.add_argument("--full_precision", action="store_true", help="train in fp32 (default: mixed precision, fp16 on GPU, bf16 on CPUs with native bf16)")
    run.add_argument("--output_dir", default="output", help="where checkpoints go")
    run.add_argument("--resume", metavar="PATH", help="continue a run from its checkpoint (same model, iteration, lr, optimizer and random state)")
    run.add_argument("--fine_tune", metavar="PATH", help="start from a checkpoint trained on other classes (new classification output)")
    run.add_argument("--eval_every", type=int, help="evaluate every N epochs (0: never; default: every epoch, or every few in a run of many)")
    run.add_argument("--checkpoint_every", type=int, default=0, help="also save last.pt every N iterations")
    run.add_argument("--logdir", help="write TensorBoard scalars here")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--skip_nonfinite", action="store_true", help="skip a batch whose loss is NaN or infinite (counted) instead of stopping")
    run.add_argument("--check_data", action="store_true", help="list every problem of the data and how the anchors cover its boxes, and exit")
    run.add_argument("--fit_anchors", action="store_true", help="print the anchor scales and ratios (and image size) that cover most training boxes, and exit")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    needed = DATASET_FLAGS.get(args.dataset, ())
    if not all(getattr(args, flag) for flag in needed):
        parser.error(f"--dataset {args.dataset} needs " + " and ".join(f"--{flag}" for flag in needed))
    if args.resume and args.fine_tune:
        parser.error("--resume and --fine_tune exclude each other: resume continues a run, fine_tune starts a new one")
    if args.jitter and args.jitter[0] > args.jitter[1]:
        parser.error(f"--jitter MIN MAX needs MIN <= MAX, got {args.jitter}")
    return args


def decide(args: argparse.Namespace, checkpoint: dict | None, world_size: int) -> tuple[argparse.Namespace, dict]:
    """Every value of the run, decided once, and where each came from: a typed flag wins over the dataset's default
    (DEFAULTS), which wins over the paper's (settings.py) and the flags' own; the lr follows the optimizer and the
    total batch. The model's settings are, on --resume, the checkpoint's (a typed one that differs is refused); on
    --fine_tune, the checkpoint's under the typed ones. `args` is left as parsed."""
    defaults = vars(build_parser().parse_args([]))
    typed = {name: value for name, value in vars(args).items() if value != defaults[name]}
    run = {**vars(args), **{name: value for name, value in DEFAULTS[args.dataset].items() if name not in typed}}
    source = {name: "typed" if name in typed else f"{args.dataset} default"
              for name in [*typed, *DEFAULTS[args.dataset]]}
    if "epochs" in typed or "iters" in typed:  # a typed length wins over the dataset's default one
        run["epochs"], run["iters"] = args.epochs, args.iters
    if args.dataset == "shapes":
        run["csv_train"], run["classes"], run["csv_val"] = shapes_demo_files(args.data_dir)
    run["workers"] = default_workers() if args.workers is None else args.workers
    if args.lr is None:
        run["lr"] = default_lr(run["optimizer"], run["batch_size"] * world_size)
        source["lr"] = f"{run['optimizer']}'s for {run['batch_size'] * world_size} images"
    asked = typed_settings(typed, MODEL_SETTINGS) | BOX_CODINGS.get(args.box_coding, {})
    if args.resume:
        settings = resumed_settings(checkpoint, args.resume, asked)
        source["model settings"] = f"{args.resume}'s"
    elif args.fine_tune:
        settings = checkpoint_settings(checkpoint).as_dict() | initial_freezing(True) | asked
        source["model settings"] = f"{args.fine_tune}'s, frozen as pretrained, where not typed"
    else:
        dataset_settings = {name: run[name] for name in MODEL_SETTINGS if name in DEFAULTS[args.dataset]}
        settings = (initial_freezing(run["pretrained"] is not False) | dataset_settings
                    | BOX_CODINGS.get(run["box_coding"], {}) | asked)
        source["model settings"] = "the paper's (settings.py) where not said"
    run["settings"] = {name: value for name, value in settings.items() if name != "num_classes"}
    run["shorten_warmup"] = "warmup_iters" not in typed  # a default warmup fits a short run
    return argparse.Namespace(**run), source


def build_datasets(run: argparse.Namespace):
    """The training and validation (None if none) datasets, their annotations read and checked."""
    if run.dataset == "coco":
        return CocoDataset(run.coco_path, run.train_set), CocoDataset(run.coco_path, run.val_set)
    if run.dataset == "voc":
        return voc_datasets(run.voc_path, run.train_set, run.val_set, run.voc_val, run.classes)
    return (CSVDataset(run.csv_train, run.classes, drop_degenerate=run.drop_degenerate_boxes),
            CSVDataset(run.csv_val, run.classes, drop_degenerate=run.drop_degenerate_boxes) if run.csv_val else None)


def train(run, model: nn.Module, train_set, val_set, device: torch.device, rank: int, world_size: int,
          checkpoint: dict | None) -> int:
    """The loop: epochs of optimizer steps (training.TrainStep), last.pt after every few, validation and best.pt
    after every few; a clean stop on Ctrl-C or SIGTERM (exit status 130)."""
    sampler, loader = training_loader(train_set, run.batch_size, run.workers, run.seed, rank, world_size,
                                      pin_memory=device.type == "cuda")
    schedule = plan_schedule(len(sampler), run.epochs, run.iters, run.warmup_iters, run.shorten_warmup,
                             run.milestones, run.lr_schedule, run.lr_step_factor, run.eval_every)
    optimizer = build_optimizer(model, run.optimizer, run.lr, run.momentum, run.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    amp_dtype = None if run.full_precision else mixed_precision_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # bf16 has fp32's exponents
    step = TrainStep(DistributedDataParallel(model) if world_size > 1 else model, optimizer, scaler, device,
                     amp_dtype, run.clip_grad)
    state = (restore_training_state(checkpoint, run.resume, model, optimizer, scheduler, scaler) if run.resume
             else {"iteration": 0, "best_map": -1.0, "skipped_batches": 0})
    say = tqdm.write if rank == 0 else lambda line: None
    log = scalar_writer(run.logdir if rank == 0 else None)  # TensorBoard

    def save(name: str) -> str:
        path = os.path.join(run.output_dir, name)
        if rank == 0:
            save_checkpoint(training_state(model, optimizer, scheduler, scaler, class_names=list(train_set.class_names),
                                           epoch=state["iteration"] // schedule.iters_per_epoch, args=vars(run),
                                           **state), path)
        return path

    precision = f"mixed precision {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else "full precision"
    resumed = f"resumed from {run.resume} at iteration {state['iteration']}: " if run.resume else ""
    say(f"{resumed}training a ResNet-{model.depth} RetinaNet on {len(train_set)} {run.dataset} images "
        f"({train_set.num_classes} classes) on {device}, {run.optimizer}, {precision}\n{schedule.describe(run.lr)}")
    stop = StopRequest()  # set by Ctrl-C or SIGTERM, at any moment; acted on at the end of a step
    with stop_on_signals(stop):
        for epoch in range(state["iteration"] // schedule.iters_per_epoch, schedule.epochs):
            model.train()
            sampler.set_epoch(epoch, state["iteration"] - epoch * schedule.iters_per_epoch)  # a resumed run goes on
            started, losses, stopping = time.perf_counter(), [], False
            for batch in (progress := tqdm(loader, desc=f"epoch {epoch + 1}", disable=rank != 0, leave=False)):
                images = batch["images"].to(device, non_blocking=True, memory_format=torch.channels_last)
                result = step(images, batch["annotations"].to(device, non_blocking=True), stop.requested)
                lr = optimizer.param_groups[0]["lr"]
                if result.nonfinite:  # stops the run unless --skip_nonfinite
                    state["skipped_batches"] += 1
                    say(nonfinite_loss(result, state["iteration"], lr, run.skip_nonfinite, run.output_dir,
                                       state["skipped_batches"]))
                else:
                    losses.append((result.classification_loss, result.regression_loss))
                    progress.set_postfix(cls=f"{losses[-1][0]:.3f}", box=f"{losses[-1][1]:.3f}", lr=f"{lr:.2g}")
                    log(state["iteration"], {"loss/classification": losses[-1][0], "loss/regression": losses[-1][1],
                                             "lr": lr})
                scheduler.step()
                state["iteration"] += 1  # counts skipped batches too: a resumed run starts after the last batch seen
                if run.checkpoint_every and state["iteration"] % run.checkpoint_every == 0:
                    save("last.pt")
                stopping = result.stop
                if state["iteration"] >= schedule.total_iters or stopping:
                    break
            mean_cls, mean_box = np.mean(losses, axis=0) if losses else (np.nan, np.nan)
            images_per_second = progress.n * run.batch_size * world_size / (time.perf_counter() - started)
            say(f"epoch {epoch + 1}: iteration {state['iteration']}/{schedule.total_iters}, mean classification loss "
                f"{mean_cls:.4f}, mean regression loss {mean_box:.4f}, lr {optimizer.param_groups[0]['lr']:.3g}, "
                f"{images_per_second:.1f} images/s")
            last_epoch = epoch + 1 == schedule.epochs
            if stopping or last_epoch or (epoch + 1) % schedule.save_every == 0:
                path = save("last.pt")
            if stopping:
                say(f"stopped at iteration {state['iteration']} and saved {path}; continue with --resume {path}")
                return 130
            if schedule.eval_every and ((epoch + 1) % schedule.eval_every == 0 or last_epoch):
                score = validation_score(model.eval(), val_set, run.batch_size, run.workers, rank, world_size,
                                         (run.output_dir, run.val_set) if run.dataset == "coco" else None)
                if score is not None:
                    say(f"validation mAP {score:.4f}")
                    log(state["iteration"], {"val/mAP": score})
                if score is not None and score > state["best_map"]:
                    state["best_map"] = score
                    say(f"new best model: {save('best.pt')}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world_size = setup_distributed(args.device)
    checkpoint = read_checkpoint(args.resume or args.fine_tune) if args.resume or args.fine_tune else None
    run, source = decide(args, checkpoint, world_size)
    if rank == 0:  # where each value came from
        print("values: " + "; ".join(f"{', '.join(name for name in source if source[name] == where)}: {where}"
                                     for where in dict.fromkeys(source.values())))
    if run.dataset == "shapes":
        make_shapes_demo(run.data_dir, run.shapes_train, run.shapes_val, run.seed)
    if run.check_data:  # every problem of the data's files, listed
        from retinanet.diagnostics.check import check_files

        if not check_files(run.dataset, [run.csv_train, run.csv_val], run.classes, run.coco_path, run.voc_path,
                           run.voc_val, (run.train_set, run.val_set), run.workers):
            return 1
    torch.manual_seed(run.seed + rank)
    train_set, val_set = build_datasets(run)
    settings = ModelSettings(**run.settings, num_classes=train_set.num_classes)
    if run.check_data or run.fit_anchors:  # how the anchors cover the training boxes, at the training size
        from retinanet.diagnostics.check import check_anchors

        check_anchors(train_set, settings, run.jitter, run.fit_anchors)
        return 0
    model = (load_model(checkpoint, num_classes=settings.num_classes, **run.settings).model if run.fine_tune else
             build_model(settings, False if run.resume else run.pretrained))
    if world_size > 1 and device.type == "cuda" and not settings.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the whole batch
    augmentation = Augmentation(run.augment) if run.augment else None
    train_set.transform = build_transform(True, settings.min_size, settings.max_size, run.jitter, augmentation)
    if val_set is not None:
        val_set.transform = build_transform(False, settings.min_size, settings.max_size)
    status = train(run, model.to(device), train_set, val_set, device, rank, world_size, checkpoint)
    if status == 0 and rank == 0:
        print(f"done: checkpoints in {os.path.abspath(run.output_dir)}")
        if run.dataset == "shapes":
            from retinanet.extras.drawing import visualize_dataset

            paths = visualize_dataset(model.eval(), val_set, os.path.join(run.output_dir, "detections"))
            print("detections (right) next to the ground truth (left) on validation images:\n  " + "\n  ".join(paths))
    if world_size > 1:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    try:
        sys.exit(run_script(main, sys.argv[1:], "train.py"))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without saving
        print("interrupted: stopped without saving; last.pt holds the last checkpoint", file=sys.stderr)
        sys.exit(130)
