"""Train a RetinaNet on the built-in shapes demo, a CSV-annotated dataset or COCO (paper §4 "Optimization").

    python train.py                                   # shapes demo: ResNet-18 from scratch on the CPU, minutes
    python train.py --dataset csv --csv_train train.csv --csv_classes classes.csv --csv_val val.csv
    python train.py --dataset coco --coco_path /data/coco --depth 50
    torchrun --nproc_per_node=8 train.py --dataset coco --coco_path /data/coco   # one process per GPU

Paper §4 "Optimization": "RetinaNet is trained with stochastic gradient descent (SGD). We use synchronized SGD
over 8 GPUs with a total of 16 images per minibatch [...] all models are trained for 90k iterations with an
initial learning rate of 0.01, which is then divided by 10 at 60k and again at 80k iterations. We use
horizontal image flipping as the only form of data augmentation [...] Weight decay of 0.0001 and momentum of
0.9 are used."
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from retinanet.check import check_coco, check_csv, report
from retinanet.checkpoint import (
    infer_architecture,
    model_from_checkpoint,
    model_state_dict,
    read_checkpoint,
    save_checkpoint,
)
from retinanet.cli import run_script
from retinanet.dataloader import AspectRatioBatchSampler, CocoDataset, CSVDataset, collate
from retinanet.drawing import visualize_dataset
from retinanet.model import PRETRAINED_FREEZE_AT, WeightsUnavailableError, build_retinanet
from retinanet.runtime import StopRequest, mixed_precision_dtype, out_of_memory_hint, setup_distributed, stop_on_signals
from retinanet.shapes import make_shapes_dataset
from retinanet.transforms import build_transform

# Per-dataset defaults for flags left unset. The demo trains a small network from scratch on small images;
# COCO follows the paper (ResNet-50, SGD, 800 px, 90k iterations at batch 16).
DEFAULTS = {
    "shapes": dict(depth=18, optimizer="adamw", batch_size=8, min_size=160, max_size=160, epochs=6,
                   warmup_iters=200, pretrained=False),
    "csv": dict(depth=50, optimizer="sgd", batch_size=8, min_size=800, max_size=1333, epochs=20,
                warmup_iters=500, pretrained=True),
    "coco": dict(depth=50, optimizer="sgd", batch_size=16, min_size=800, max_size=1333, iters=90_000,
                 warmup_iters=500, pretrained=True),
}


# AdamW trains the from-scratch demo network far faster than the paper's SGD (in a feasibility run on 2 CPU cores,
# SGD at 0.01 reached AP50 0.27 in 10 minutes). Its lr is 3e-4, not the usual 1e-3: in the demo, 1e-3 kills the
# classification subnet once warmup passes about 4e-4 (its loss climbs back to the 1.12 of the π = 0.01 prior and
# stays there, mAP 0), while 3e-4 reaches mAP 0.86 in 6 epochs.
ADAMW_LR = 3e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("shapes", "csv", "coco"), default="shapes", help="which data to train on (default: the built-in shapes demo)")
    data.add_argument("--coco_path", help="COCO root holding annotations/instances_{set}.json and images/{set}/")
    data.add_argument("--train_set", default="train2017", help="COCO training set name")
    data.add_argument("--val_set", default="val2017", help="COCO validation set name")
    data.add_argument("--csv_train", help="CSV annotations for training: path,x1,y1,x2,y2,class_name")
    data.add_argument("--csv_classes", help="CSV class list: class_name,id")
    data.add_argument("--csv_val", help="CSV annotations for validation (optional)")
    data.add_argument("--data_dir", default="data/shapes", help="where the shapes demo data is generated")
    data.add_argument("--shapes_train", type=int, default=1500, help="number of shapes training images")
    data.add_argument("--shapes_val", type=int, default=200, help="number of shapes validation images")
    data.add_argument("--min_size", type=int, help="shorter image side after resizing (paper: 800)")
    data.add_argument("--max_size", type=int, help="longest image side after resizing (default 1333)")
    data.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="multi-scale training: shorter side drawn from MIN..MAX")
    data.add_argument("--workers", type=int, default=2, help="data loading processes per training process")

    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=int, choices=(18, 34, 50, 101, 152), help="ResNet depth")
    model.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH", help="start from ImageNet weights (torchvision's, or a local file)")
    model.add_argument("--no_pretrained", dest="pretrained", action="store_false", help="train the backbone from scratch (BatchNorm stays trainable)")
    model.add_argument("--freeze_at", type=int, choices=range(6), metavar="{0..5}", help="freeze the stem (1) and the first residual stages (2..5) (default: 2 with pretrained weights, as detectron2; 0 from scratch)")
    model.add_argument("--box_loss", choices=("smooth_l1", "giou"), default="smooth_l1", help="box regression loss (paper: smooth L1)")
    model.add_argument("--loss_normalizer", choices=("batch", "ema"), default="batch", help="divide losses by this batch's foreground count (paper) or its moving average")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), help="SGD as in the paper; AdamW converges faster from scratch")
    optim.add_argument("--epochs", type=int, help="number of passes over the training set")
    optim.add_argument("--iters", type=int, help="number of iterations (overrides --epochs)")
    optim.add_argument("--batch_size", type=int, help="images per iteration per process")
    optim.add_argument("--lr", type=float, help="learning rate (default: 0.01 x total batch / 16 for SGD, 3e-4 for AdamW)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay, not applied to BatchNorm and biases (paper: 1e-4)")
    optim.add_argument("--warmup_iters", type=int, help="linear learning-rate warmup length")
    optim.add_argument("--lr_schedule", choices=("step", "cosine"), default="step", help="step: divide by --gamma at each milestone (paper); cosine")
    optim.add_argument("--milestones", type=int, nargs="+", help="iterations of the lr steps (default: 2/3 and 8/9 of training, as 60k and 80k of 90k)")
    optim.add_argument("--gamma", type=float, default=0.1, help="lr factor at each milestone (paper: 0.1)")
    optim.add_argument("--clip_grad", type=float, help="clip the gradient norm to this value (off by default)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    run.add_argument("--full_precision", action="store_true", help="train in fp32 (default: mixed precision, fp16 on GPU, bf16 on CPUs with native bf16)")
    run.add_argument("--output_dir", default="output", help="where checkpoints go")
    run.add_argument("--resume", metavar="PATH", help="continue a run from its checkpoint (same iteration, lr, optimizer state)")
    run.add_argument("--fine_tune", metavar="PATH", help="start from a checkpoint trained on other classes (new classification output)")
    run.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (0: never)")
    run.add_argument("--checkpoint_every", type=int, default=0, help="also save last.pt every N iterations")
    run.add_argument("--logdir", help="write TensorBoard scalars here")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--skip_nonfinite", action="store_true", help="skip a batch whose loss is NaN or infinite (counted and reported) instead of stopping")
    run.add_argument("--check_data", action="store_true", help="read every annotation and image, list all problems, and exit (non-zero if training could not start)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Contradictory or missing flags end the run before any work, with argparse's usage message."""
    if args.dataset == "csv" and not (args.csv_train and args.csv_classes):
        parser.error("--dataset csv needs --csv_train and --csv_classes")
    if args.dataset == "coco" and not args.coco_path:
        parser.error("--dataset coco needs --coco_path")
    if args.resume and args.fine_tune:
        parser.error("--resume and --fine_tune exclude each other: resume continues a run, fine_tune starts a new one")
    if args.jitter and args.jitter[0] > args.jitter[1]:
        parser.error(f"--jitter MIN MAX needs MIN <= MAX, got {args.jitter}")


def build_datasets(args, rank: int, world_size: int):
    """Training and validation datasets (validation may be None). The shapes demo data is generated by rank 0
    while the other ranks wait, then read by all through the same CSV loader a user's data goes through."""
    train_transform = build_transform(True, args.min_size, args.max_size, tuple(args.jitter) if args.jitter else None)
    val_transform = build_transform(False, args.min_size, args.max_size)
    if args.dataset == "coco":
        return (CocoDataset(args.coco_path, args.train_set, train_transform),
                CocoDataset(args.coco_path, args.val_set, val_transform))
    if args.dataset == "shapes":
        if rank == 0:
            make_shapes_dataset(args.data_dir, "train", args.shapes_train, seed=args.seed)
            make_shapes_dataset(args.data_dir, "val", args.shapes_val, seed=args.seed + 1)
        if world_size > 1:
            dist.barrier()
        train = make_shapes_dataset(args.data_dir, "train", args.shapes_train, seed=args.seed)
        val = make_shapes_dataset(args.data_dir, "val", args.shapes_val, seed=args.seed + 1)
        args.csv_train, args.csv_classes, args.csv_val = train["csv"], train["classes"], val["csv"]
    train_set = CSVDataset(args.csv_train, args.csv_classes, train_transform)
    val_set = CSVDataset(args.csv_val, args.csv_classes, val_transform) if args.csv_val else None
    return train_set, val_set


def build_model(args, num_classes: int):
    started_trained = args.pretrained is not False or args.fine_tune is not None
    freeze_at = args.freeze_at if args.freeze_at is not None else PRETRAINED_FREEZE_AT if started_trained else 0
    if args.fine_tune:
        return model_from_checkpoint(read_checkpoint(args.fine_tune), num_classes, freeze_bn=True, freeze_at=freeze_at)
    pretrained = False if args.resume else args.pretrained
    return build_retinanet(args.depth, num_classes, pretrained=pretrained, freeze_bn=started_trained,
                           freeze_at=freeze_at, box_loss=args.box_loss, loss_normalizer=args.loss_normalizer)


def build_optimizer(args, model, world_size: int) -> torch.optim.Optimizer:
    """SGD with momentum (paper) or AdamW; no weight decay on BatchNorm parameters and biases (as detectron2)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in trainable if p.ndim > 1]
    no_decay = [p for name, p in trainable if p.ndim <= 1]  # biases and BatchNorm weights are 1-D
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.lr is None:
        # §4: lr 0.01 at 16 images per batch, scaled linearly with the total batch (Goyal et al. 2017).
        args.lr = 0.01 * args.batch_size * world_size / 16 if args.optimizer == "sgd" else ADAMW_LR
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.lr)


def lr_factor(iteration: int, total_iters: int, args) -> float:
    """Learning rate multiplier at an iteration: linear warmup, then step decay or cosine."""
    warmup = min(1.0, (iteration + 1) / args.warmup_iters) if args.warmup_iters else 1.0
    if args.lr_schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * iteration / total_iters))
    milestones = args.milestones or [total_iters * 2 // 3, total_iters * 8 // 9]  # 60k and 80k of 90k
    return warmup * args.gamma ** sum(iteration >= milestone for milestone in milestones)


def check_same_architecture(path: str, state_dict: dict, model) -> None:
    """Raise ValueError, saying what differs, if a checkpoint's weights do not fit the model of this run."""
    depth, num_classes, _ = infer_architecture(state_dict)
    if (depth, num_classes) != (model.depth, model.num_classes):
        raise ValueError(
            f"{path}: holds a ResNet-{depth} RetinaNet for {num_classes} classes, but this run builds a "
            f"ResNet-{model.depth} for {model.num_classes} classes. Resume with the run's own --depth and data, "
            f"or start from it with --fine_tune to train it on other classes."
        )


class Trainer:
    """The training state and loop: model, optimizer, schedule, mixed precision, checkpoints, logging."""

    def __init__(self, args, model, train_set, val_set, device, rank: int, world_size: int):
        self.args, self.device, self.rank, self.world_size = args, device, rank, world_size
        self.model = model.to(device)
        self.train_set, self.val_set = train_set, val_set
        self.sampler = AspectRatioBatchSampler(
            [train_set.aspect_ratio(i) for i in range(len(train_set))], args.batch_size,
            shuffle=True, drop_last=False, num_replicas=world_size, rank=rank, seed=args.seed,
        )
        self.iters_per_epoch = len(self.sampler)
        self.total_iters = args.iters or args.epochs * self.iters_per_epoch
        self.optimizer = build_optimizer(args, self.model, world_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, self.total_iters, args)
        )
        self.amp_dtype = None if args.full_precision else mixed_precision_dtype(device)
        # fp16 needs its loss scaled so that small gradients do not underflow; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best_map, self.skipped_batches = 0, -1.0, 0
        self.stop = StopRequest()
        self.ddp_model = DistributedDataParallel(self.model) if world_size > 1 else self.model
        self.writer = None
        if args.logdir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(args.logdir)

    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.iteration // self.iters_per_epoch,
            "iteration": self.iteration,
            "best_map": self.best_map,
            "skipped_batches": self.skipped_batches,
            "class_names": list(self.train_set.class_names),
            "model_settings": self.model.settings.as_dict(),
            "args": {k: v for k, v in vars(self.args).items()},
        }

    def save(self, name: str) -> str:
        path = os.path.join(self.args.output_dir, name)
        if self.rank == 0:
            os.makedirs(self.args.output_dir, exist_ok=True)
            save_checkpoint(self.checkpoint(), path)
        return path

    def resume(self, path: str) -> None:
        checkpoint = read_checkpoint(path)
        if "optimizer" not in checkpoint:
            raise ValueError(f"{path}: a bare state dict cannot be resumed; use --fine_tune to start from it")
        check_same_architecture(path, model_state_dict(checkpoint), self.model)
        self.model.load_state_dict(model_state_dict(checkpoint))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration, self.best_map = checkpoint["iteration"], checkpoint["best_map"]
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        self.log(f"resumed from {path} at iteration {self.iteration}, lr {self.lr():.3g}")

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def log(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    def epoch_loader(self, epoch: int) -> DataLoader:
        """This epoch's batches, skipping those a resumed run has already trained on."""
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)[self.iteration - epoch * self.iters_per_epoch:]
        return DataLoader(
            self.train_set, batch_sampler=batches, collate_fn=collate, num_workers=self.args.workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_step(self, batch) -> tuple[float, float]:
        """One optimizer step on a batch; returns the two losses (NaN for a batch skipped by --skip_nonfinite)."""
        images = batch["images"].to(self.device, non_blocking=True)
        annotations = batch["annotations"].to(self.device, non_blocking=True)
        with out_of_memory_hint(images.shape):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                cls_loss, box_loss = self.ddp_model(images, annotations)
            cls_value, box_value = cls_loss.item(), box_loss.item()
            nonfinite, self.stop.requested = self.any_rank(not math.isfinite(cls_value + box_value), self.stop.requested)
            if nonfinite:
                self.skip_nonfinite(cls_value, box_value)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(cls_loss + box_loss).backward()
                if self.args.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.scheduler.step()
        self.iteration += 1  # counts skipped batches too: a resumed run starts after the last batch seen
        return (cls_value, box_value) if not nonfinite else (math.nan, math.nan)

    def skip_nonfinite(self, cls_value: float, box_value: float) -> None:
        """Count a batch whose loss is not finite, or stop the run with a message if --skip_nonfinite is off."""
        where = f"at iteration {self.iteration} (lr {self.lr():.3g}, classification {cls_value}, regression {box_value})"
        if not self.args.skip_nonfinite:
            raise SystemExit(
                f"error: the loss is not finite {where}. Try a lower --lr, a longer --warmup_iters or --clip_grad 10, "
                f"or --skip_nonfinite to skip such batches; {self.args.output_dir}/last.pt holds the last checkpoint."
            )
        self.skipped_batches += 1
        self.log(f"skipped a batch: the loss is not finite {where}; {self.skipped_batches} skipped so far")

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over all processes, so that they skip or stop together: a process that skipped the
        backward pass alone would leave the others waiting forever in DDP's gradient all-reduce."""
        if self.world_size == 1:
            return list(flags)
        flags_tensor = torch.tensor(flags, dtype=torch.float32, device=self.device)
        dist.all_reduce(flags_tensor, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in flags_tensor.tolist()]

    def train_epoch(self, epoch: int) -> None:
        self.model.train()
        loader = self.epoch_loader(epoch)
        progress = tqdm(loader, desc=f"epoch {epoch + 1}", disable=self.rank != 0, leave=False)
        start, images_seen, speed = time.perf_counter(), 0, 0.0
        loss_sums, num_losses = [0.0, 0.0], 0
        for batch in progress:
            cls_loss, box_loss = self.train_step(batch)
            if math.isfinite(cls_loss + box_loss):
                loss_sums, num_losses = [loss_sums[0] + cls_loss, loss_sums[1] + box_loss], num_losses + 1
            images_seen += len(batch["indices"]) * self.world_size
            speed = images_seen / (time.perf_counter() - start)
            progress.set_postfix(cls=f"{cls_loss:.3f}", box=f"{box_loss:.3f}", lr=f"{self.lr():.2g}", img_s=f"{speed:.1f}")
            self.scalars({"loss/classification": cls_loss, "loss/regression": box_loss, "lr": self.lr()})
            if self.args.checkpoint_every and self.iteration % self.args.checkpoint_every == 0:
                self.save("last.pt")
            if self.iteration >= self.total_iters or self.stop.requested:
                break
        mean_cls, mean_box = (total / max(num_losses, 1) for total in loss_sums)
        skipped = f", {self.skipped_batches} batches skipped so far (non-finite loss)" if self.skipped_batches else ""
        self.log(f"epoch {epoch + 1}: iteration {self.iteration}/{self.total_iters}, mean classification loss "
                 f"{mean_cls:.4f}, mean regression loss {mean_box:.4f}, lr {self.lr():.3g}, {speed:.1f} images/s{skipped}")

    def scalars(self, values: dict) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, self.iteration)

    def evaluate(self) -> float | None:
        """Validation mAP@0.5 (VOC-style) for CSV and shapes data, COCO AP@[.5:.95] for COCO; rank 0 only."""
        if self.val_set is None or self.rank != 0:
            return None
        self.model.eval()
        if self.args.dataset == "coco":
            from retinanet.coco_evaluation import evaluate_coco

            score = evaluate_coco(self.model, self.val_set, batch_size=self.args.batch_size,
                                  output_dir=self.args.output_dir, set_name=self.args.val_set)[0]
        else:
            from retinanet.evaluation import evaluate

            score = evaluate(self.model, self.val_set, batch_size=self.args.batch_size)["mAP"]
        self.scalars({"val/mAP": score})
        return score

    def run(self) -> None:
        first_epoch = self.iteration // self.iters_per_epoch
        epochs = math.ceil(self.total_iters / self.iters_per_epoch)
        for epoch in range(first_epoch, epochs):
            self.train_epoch(epoch)
            self.save("last.pt")
            if self.stop.requested:
                return
            last = epoch + 1 == epochs
            if self.args.eval_every and ((epoch + 1) % self.args.eval_every == 0 or last):
                self.after_evaluation(self.evaluate())
            if self.world_size > 1:
                dist.barrier()

    def after_evaluation(self, score: float | None) -> None:
        if score is None:
            return
        self.log(f"validation mAP {score:.4f}")
        if score > self.best_map:
            self.best_map = score
            self.log(f"new best model: {self.save('best.pt')}")


def draw_demo_detections(model, val_set, output_dir: str, log, num_images: int = 8) -> None:
    """The end of the shapes demo: the trained model's detections drawn next to the ground truth."""
    paths = visualize_dataset(model, val_set, val_set.class_names, os.path.join(output_dir, "detections"),
                              limit=num_images)
    log("detections (right) next to the ground truth (left) on validation images:\n  " + "\n  ".join(paths))


def check_data(args, rank: int, world_size: int) -> int:
    """--check_data: every problem of the training and validation data, listed; 0 if training can start."""
    if args.dataset == "coco":
        results = [report(check_coco(args.coco_path, name, args.workers), f"COCO set {name}")
                   for name in (args.train_set, args.val_set)]
    else:
        if args.dataset == "shapes":
            build_datasets(args, rank, world_size)  # generates the data and points the csv_* paths to it
        results = [report(check_csv(path, args.csv_classes, args.workers), path)
                   for path in (args.csv_train, args.csv_val) if path]
    return 0 if all(results) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world_size = setup_distributed(args.device)
    if args.check_data:
        return check_data(args, rank, world_size)
    torch.manual_seed(args.seed + rank)
    train_set, val_set = build_datasets(args, rank, world_size)
    model = build_model(args, train_set.num_classes)
    trainer = Trainer(args, model, train_set, val_set, device, rank, world_size)
    if args.resume:
        trainer.resume(args.resume)
    trainer.log(
        f"training a ResNet-{model.depth} RetinaNet on {len(train_set)} {args.dataset} images "
        f"({train_set.num_classes} classes) on {device} for {trainer.total_iters} iterations of "
        f"{args.batch_size * world_size} images, {args.optimizer} at lr {args.lr:g}, "
        f"{'mixed precision ' + str(trainer.amp_dtype).removeprefix('torch.') if trainer.amp_dtype else 'full precision'}"
    )
    with stop_on_signals(trainer.stop):
        trainer.run()
    if trainer.stop.requested:
        path = os.path.join(args.output_dir, "last.pt")
        trainer.log(f"stopped at iteration {trainer.iteration} and saved {path}; continue with --resume {path}")
        return 130
    trainer.log(f"done: checkpoints in {os.path.abspath(args.output_dir)}")
    if args.dataset == "shapes" and rank == 0:
        draw_demo_detections(trainer.model.eval(), val_set, args.output_dir, trainer.log)
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:  # bad input or no weights: one message that says what to do, exit status 2
        sys.exit(run_script(main, sys.argv[1:], prog=None, errors=(ValueError, WeightsUnavailableError)))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without saving
        print("interrupted: stopped without saving; last.pt holds the last checkpoint", file=sys.stderr)
        sys.exit(130)
