"""Benchmark this project's RetinaNet against torchvision's on identical synthetic batches, and time the data pipeline.

Measurements, one process, one run (each prints one JSON line; a table with the ratio ours / torchvision ends it):
- train:     images/s of a whole training step at --batch_size: target assignment and losses, forward, backward,
             SGD with momentum 0.9. In fp32, in each memory format of --memory_formats. Ours is train.py's own
             step (retinanet.training.TrainStep), with its one read of the losses.
- train_amp: the same under train.py's mixed precision (retinanet.training.mixed_precision_dtype): fp16 with a
             GradScaler on a GPU, bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX); skipped on other CPUs
             (bf16 is emulated there) and with --no_amp.
- infer_b1:  latency at batch 1, post-processing (top-k, decoding, NMS) included.
- infer_b8:  images/s at batch 8, likewise.
- data:      images/s of one data-loading worker: JPEG decoding, resize, flip, the augmentations of --augment
             (CSVDataset with build_transform) and collate, on JPEG files of COCO-like size (640x480) written from
             scikit-image's photos, with 1 to 15 boxes each.
Each step is timed alone, on a GPU with CUDA events; "ms" is the median step and img_per_s is batch size / median,
steady on a busy machine. "host_waits" counts, in one extra untimed step, the operations that make the host wait
for a GPU (reads of values, sizes only the device knows, boolean masks, tensors made from host data; HostWaits).
"peak_gib" is torch.cuda.max_memory_allocated on a GPU; on a CPU, the process's peak resident memory (Python and
the libraries included), restarted before each measurement on Linux, elsewhere the peak of the run so far.

Like for like: both detectors start from scratch (no pretrained weights, trainable BatchNorm), with the same
classes, input size (torchvision's min_size / max_size are set so that it does not resize) and freeze_at. Both
keep 100 detections per image after NMS 0.5, and both use score threshold --score_threshold, 0 by default: an
untrained network scores every anchor near the prior π = 0.01, so the paper's 0.05 would leave nothing to NMS;
with 0, all 1000 candidates per level reach NMS, the most post-processing a trained network could need.
Both normalise their input inside the model (ours takes the uint8 images, torchvision float ones).

    python tools/benchmark.py --device cpu --depth 18 --image_size 256 256 --batch_size 4
    python tools/benchmark.py --device cuda --depth 50 --image_size 800 1216 --batch_size 8
    python tools/benchmark.py --modes data --image_size 800 1333 --threads 1 --augment photometric zoom_out crop rot90 vflip
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import skimage.data
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from tqdm import tqdm

# Run as a script (python tools/benchmark.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.checkpoint import build_model  # noqa: E402
from retinanet.data.augmentations import AUGMENTATIONS, Augmentation  # noqa: E402
from retinanet.dataloader import CSVDataset, build_transform, collate  # noqa: E402
from retinanet.settings import ModelSettings  # noqa: E402
from retinanet.training import TrainStep, build_optimizer, mixed_precision_dtype  # noqa: E402

IMPLS = ("ours", "torchvision")
MODES = ("train", "train_amp", "infer_b1", "infer_b8", "data")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MAX_BOXES = 15  # each synthetic image has 1..15 boxes
BOX_SIDE_RANGE = (1 / 16, 1 / 2)  # synthetic box sides, as fractions of the image side
NUM_SYNTHETIC_BATCHES = 4  # distinct batches, cycled through the steps
DETECTIONS_PER_IMAGE = 100  # ours' default max_detections; torchvision's default is 300
JPEG_SIZE = (640, 480)  # (width, height) of the data pipeline's files, a typical COCO image
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # bundled with scikit-image
LINUX_CLEAR_REFS = "/proc/self/clear_refs"  # writing "5" there resets the peak resident memory


@dataclass
class Batch:
    """One synthetic batch in both input formats: ours (a tensor and padded annotations) and torchvision's."""

    images: torch.Tensor  # (B, 3, H, W) uint8
    annotations: torch.Tensor  # (B, G, 5): x1, y1, x2, y2, class; padding rows -1
    targets: list[dict[str, torch.Tensor]]  # per image {"boxes": (G_i, 4), "labels": (G_i,) int64}


@dataclass
class Detector:
    """A model and the two calls the benchmark times, each in the model's own input format."""

    model: nn.Module
    train_step: Callable[[Batch], None]  # one optimizer step on a batch
    detect: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]  # detections of (B, 3, H, W) uint8 images


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory count (on a CPU only where Linux lets us, otherwise the process's peak so far)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.access(LINUX_CLEAR_REFS, os.W_OK):
        # glibc keeps freed memory, which would count as resident: hand it back first, if this C library can.
        malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if malloc_trim is not None:
            malloc_trim(0)
        with open(LINUX_CLEAR_REFS, "w") as file:
            file.write("5")


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the CPU process's peak resident memory, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic_batches(
    batch_size: int, image_size: tuple[int, int], num_classes: int, device: torch.device,
    num_batches: int = NUM_SYNTHETIC_BATCHES, seed: int = 0,
) -> list[Batch]:
    """Random images with 1..MAX_BOXES random boxes each, the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    side_scale = torch.tensor([width, height], dtype=torch.float32)
    low, high = BOX_SIDE_RANGE
    batches = []
    for _ in range(num_batches):
        counts = torch.randint(1, MAX_BOXES + 1, (batch_size,), generator=generator).tolist()
        annotations = torch.full((batch_size, max(counts), 5), -1.0)  # (B, G, 5)
        for i, count in enumerate(counts):
            sides = (low + (high - low) * torch.rand(count, 2, generator=generator)) * side_scale  # (G_i, 2)
            corners = torch.rand(count, 2, generator=generator) * (side_scale - sides)  # (G_i, 2) top-left
            labels = torch.randint(0, num_classes, (count, 1), generator=generator).float()  # (G_i, 1)
            annotations[i, :count] = torch.cat([corners, corners + sides, labels], dim=1)  # -> (G_i, 5)
        images = torch.randint(0, 256, (batch_size, 3, height, width), generator=generator, dtype=torch.uint8)
        annotations = annotations.to(device)
        targets = [
            {"boxes": rows[:count, :4], "labels": rows[:count, 4].long()} for rows, count in zip(annotations, counts)
        ]
        batches.append(Batch(images.to(device), annotations, targets))
    return batches


def optimizer_of(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 over the trainable parameters, the same for both models."""
    return build_optimizer(model, "sgd", lr=args.lr, weight_decay=args.weight_decay)


def build_ours(args: argparse.Namespace, autocast_dtype: torch.dtype | None, device: torch.device) -> Detector:
    """This project's RetinaNet, trained by train.py's step."""
    settings = ModelSettings(num_classes=args.num_classes, depth=args.depth, freeze_at=args.freeze_at,
                             score_threshold=args.score_threshold, max_detections=DETECTIONS_PER_IMAGE)
    model = build_model(settings).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    step = TrainStep(model, optimizer_of(model, args), scaler, device, autocast_dtype)
    return Detector(model, lambda batch: step(batch.images, batch.annotations, stop_requested=False), model)


def build_torchvision(args: argparse.Namespace, autocast_dtype: torch.dtype | None, device: torch.device) -> Detector:
    """torchvision's RetinaNet with a ResNet-`depth` FPN backbone; at depth 50, the very network of
    retinanet_resnet50_fpn(weights=None, weights_backbone=None). Built from its parts because that function
    ignores trainable_backbone_layers without pretrained weights, and freeze_at must apply to both models. Trained
    by the usual loop of torch.amp: autocast, scaled backward, GradScaler's step."""
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{args.depth}",
        weights=None,
        norm_layer=nn.BatchNorm2d,  # trainable, as ours from scratch (torchvision freezes it for pretrained weights)
        trainable_layers=5 - args.freeze_at,
        returned_layers=[2, 3, 4],  # C3, C4, C5
        extra_blocks=LastLevelP6P7(256, 256),  # P6, P7, as retinanet_resnet50_fpn
    )
    model = TorchvisionRetinaNet(
        backbone, args.num_classes, min_size=min(args.image_size), max_size=max(args.image_size),
        score_thresh=args.score_threshold, detections_per_img=DETECTIONS_PER_IMAGE,
    ).to(device)
    optimizer = optimizer_of(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def train_step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = sum(model(list(batch.images.float() / 255), batch.targets).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def detect(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return model(list(images.float() / 255))

    return Detector(model, train_step, detect)


BUILDERS = {"ours": build_ours, "torchvision": build_torchvision}


class HostWaits(TorchDispatchMode):
    """Records, by name, each operation run inside it that would make the host wait for a GPU: reading a value
    (item, tolist), an output whose size only the device knows (nonzero, NMS, ...), a selection by boolean mask, a
    tensor made from host data (on a GPU, a copy from the host). Counted on any device, by name; tolist runs
    without dispatch, so it is wrapped while inside."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
    DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "nms"}
    FROM_HOST = {"lift_fresh", "lift_fresh_copy"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __enter__(self):
        tolist = self.tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda tensor: self.found.append("tolist") or tolist(tensor)
        return super().__enter__()

    def __exit__(self, *exception):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exception)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        if name in self.READS | self.DATA_DEPENDENT | self.FROM_HOST:
            self.found.append(name)
        elif any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ()):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def time_steps(step: Callable[[int], None], steps: int, warmup: int, device: torch.device, desc: str) -> float:
    """Median seconds of `steps` calls step(i), after `warmup` untimed ones: on a GPU, between CUDA events
    recorded around each call (the GPU's own time, read once all steps are done), on a CPU by the clock."""
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (start, end) in enumerate(tqdm(events, desc=desc, leave=False)):
            start.record()
            step(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1000 for start, end in events)
    seconds = []
    for i in tqdm(range(steps), desc=desc, leave=False):
        start = time.perf_counter()
        step(warmup + i)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def host_waits(step: Callable[[int], None], index: int) -> int:
    """How many times one more call step(index) makes the host wait for the device (HostWaits)."""
    with HostWaits() as waits:
        step(index)
    return len(waits.found)


def measure_model(impl: str, mode: str, memory_format: str, device: torch.device, args: argparse.Namespace) -> dict:
    """One measurement of one detector: a JSON-ready record."""
    batch_size = {"infer_b1": 1, "infer_b8": 8}.get(mode, args.batch_size)
    batches = synthetic_batches(batch_size, tuple(args.image_size), args.num_classes, device)
    for batch in batches:
        batch.images = batch.images.contiguous(memory_format=MEMORY_FORMATS[memory_format])
    autocast_dtype = mixed_precision_dtype(device) if mode == "train_amp" else None
    torch.manual_seed(0)
    detector = BUILDERS[impl](args, autocast_dtype, device)
    detector.model.to(memory_format=MEMORY_FORMATS[memory_format])
    if mode.startswith("train"):
        detector.model.train()
        step = lambda i: detector.train_step(batches[i % len(batches)])  # noqa: E731
    else:
        detector.model.eval()
        step = lambda i: detector.detect(batches[i % len(batches)].images)  # noqa: E731
    reset_peak_memory(device)
    with torch.inference_mode(not mode.startswith("train")):
        seconds = time_steps(step, args.steps, args.warmup, device, f"{impl} {mode} {memory_format}")
        peak_gib = peak_memory_gib(device)
        waits = host_waits(step, args.warmup + args.steps)
    return {
        "impl": impl, "mode": mode, "memory_format": memory_format, "batch_size": batch_size,
        "img_per_s": batch_size / seconds, "ms": 1000 * seconds, "peak_gib": peak_gib, "host_waits": waits,
        "dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
    }


def write_jpeg_dataset(folder: str, num_images: int, num_classes: int, seed: int = 0) -> tuple[str, str]:
    """num_images 640x480 JPEG files resized from scikit-image's photos, 1..MAX_BOXES random boxes each, listed in a
    CSVDataset annotation file. Returns the paths of the annotation and class files."""
    rng = np.random.default_rng(seed)
    encoded = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(JPEG_SIZE)
        path = os.path.join(folder, f"{name}.jpg")
        photo.save(path, quality=90)
        with open(path, "rb") as file:
            encoded.append(file.read())
    width, height = JPEG_SIZE
    rows = []
    for i in range(num_images):
        image_path = os.path.join(folder, f"{i:05d}.jpg")
        with open(image_path, "wb") as file:
            file.write(encoded[i % len(encoded)])
        for _ in range(rng.integers(1, MAX_BOXES + 1)):
            x1, y1 = rng.uniform(0, width - 32), rng.uniform(0, height - 32)
            x2, y2 = rng.uniform(x1 + 16, width), rng.uniform(y1 + 16, height)
            rows.append(f"{image_path},{x1:.1f},{y1:.1f},{x2:.1f},{y2:.1f},class{rng.integers(num_classes)}\n")
    annotation_file, class_file = os.path.join(folder, "annotations.csv"), os.path.join(folder, "classes.csv")
    with open(annotation_file, "w") as file:
        file.writelines(rows)
    with open(class_file, "w") as file:
        file.writelines(f"class{c},{c}\n" for c in range(num_classes))
    return annotation_file, class_file


def measure_data(args: argparse.Namespace) -> dict:
    """Images/s of one data-loading worker: the main process reads, transforms and collates (num_workers=0)."""
    num_batches = args.warmup + args.steps
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        annotation_file, class_file = write_jpeg_dataset(folder, num_batches * args.batch_size, args.num_classes)
        # The training transform, resized as the models' input: shorter side min(H, W), longer at most max(H, W).
        transform = build_transform(True, min(args.image_size), max(args.image_size),
                                    augmentation=Augmentation(args.augment))
        dataset = CSVDataset(annotation_file, class_file, transform=transform)
        loader = iter(DataLoader(dataset, batch_size=args.batch_size, num_workers=0, collate_fn=collate))
        reset_peak_memory(cpu)
        seconds = time_steps(lambda i: next(loader), args.steps, args.warmup, cpu, "ours data")
    return {
        "impl": "ours", "mode": "data", "memory_format": "-", "batch_size": args.batch_size,
        "img_per_s": args.batch_size / seconds, "ms": 1000 * seconds, "peak_gib": peak_memory_gib(cpu),
        "host_waits": 0, "dtype": "uint8", "augment": args.augment,
    }


def print_table(records: list[dict]) -> None:
    """One row per (mode, memory format): images/s, ms, peak GiB and host waits per step of both models, and the
    ratio ours / torchvision of images/s (above 1: ours is faster)."""
    header = ("mode", "format", "ours img/s", "tv img/s", "ours/tv", "ours ms", "tv ms", "ours GiB", "tv GiB",
              "ours waits", "tv waits")
    print("\n" + " ".join(f"{title:>13}" for title in header))
    by_key = {(record["mode"], record["memory_format"], record["impl"]): record for record in records}
    for mode, memory_format in dict.fromkeys((record["mode"], record["memory_format"]) for record in records):
        ours, theirs = (by_key.get((mode, memory_format, impl)) for impl in IMPLS)
        speed, ms, gib, waits = (
            [f"{record[key]:.{digits}f}" if record else "-" for record in (ours, theirs)]
            for key, digits in (("img_per_s", 2), ("ms", 1), ("peak_gib", 2), ("host_waits", 0))
        )
        ratio = f"{ours['img_per_s'] / theirs['img_per_s']:.2f}" if ours and theirs else "-"
        print(" ".join(f"{cell:>13}" for cell in (mode, memory_format, *speed, ratio, *ms, *gib, *waits)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152), help="ResNet depth")
    parser.add_argument("--num_classes", type=int, default=80, help="classes of both detectors (COCO's 80)")
    parser.add_argument("--batch_size", type=int, default=8, help="training batch and data pipeline batch")
    parser.add_argument("--image_size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
                        help="input height and width (multiples of 32: neither model then pads)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 20 on a GPU, 5 on a CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: 5 on a GPU, 1 on a CPU)")
    parser.add_argument("--amp", action="store_true", default=True,
                        help="also time mixed-precision training as train.py runs it (the default)")
    parser.add_argument("--no_amp", dest="amp", action="store_false", help="time fp32 training only")
    parser.add_argument("--freeze_at", type=int, default=0, choices=range(6),
                        help="freeze the stem and the first freeze_at - 1 ResNet stages, in both models")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="measurements to run")
    parser.add_argument("--memory_formats", nargs="+", default=list(MEMORY_FORMATS), choices=list(MEMORY_FORMATS),
                        help="memory formats of models and inputs, for the train and infer modes")
    parser.add_argument("--score_threshold", type=float, default=0.0,
                        help="detection score threshold of both models (see above why 0)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="SGD weight decay")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice; a data-loading worker has 1)")
    parser.add_argument("--augment", nargs="+", choices=AUGMENTATIONS, default=[], metavar="NAME",
                        help=f"data mode: train.py's augmentations beyond flips ({', '.join(AUGMENTATIONS)})")
    parser.add_argument("--output", help="also write the JSON records to this file, one per line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the measurements of `argv` (sys.argv by default); print and return their records."""
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (20 if on_gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    # train_amp: train.py's mixed precision, if it has one on this device (not on CPUs without bf16 instructions)
    modes = [mode for mode in args.modes if mode != "train_amp" or (args.amp and mixed_precision_dtype(device))]
    print(f"Benchmark on {device} ({torch.get_num_threads()} CPU threads), ResNet-{args.depth}, "
          f"{args.image_size[0]}x{args.image_size[1]} images, batch {args.batch_size}, {args.steps} timed steps "
          f"after {args.warmup}; modes {', '.join(modes)}", file=sys.stderr)
    records = []
    for mode in modes:
        if mode == "data":
            records.append(measure_data(args))
            print(json.dumps(records[-1]), flush=True)
            continue
        for memory_format in args.memory_formats:
            for impl in IMPLS:
                records.append(measure_model(impl, mode, memory_format, device, args))
                print(json.dumps(records[-1]), flush=True)
    print_table(records)
    if args.output:
        with open(args.output, "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
    print(f"{len(records)} records: the JSON lines above" + (f", also in {args.output}" if args.output else ""),
          file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
