"""The minibatches of images that paper §4.1 "Optimization" trains on: what a detection dataset's item is, batching
and aspect-ratio grouping. The datasets of annotation files (CSV, COCO, Pascal VOC) are in data/datasets.py; each
reads its images and boxes and passes both through the transforms of §4.1 (transforms.py). Batches hold images of
one orientation only (landscape or portrait), as in detectron2's aspect ratio grouping, so that little of a padded
batch is padding.

An item of every dataset is a dict:
    image:         (3, H, W) uint8, RGB, resized, maybe flipped and augmented (the model normalises it)
    annotations:   (N, 5) float32 rows x1, y1, x2, y2 (pixels of the resized image), class index 0..K-1
    difficult:     (N,) bool, the boxes evaluation neither counts as hits nor as misses (VOC's; training uses them)
    scale:         resized size / original size; without augmentation, boxes / scale are in the original pixels
    index:         the dataset index
    original_size: (height, width) of the image file

The training sampler asks for items by (index, seed): the item's random transforms then draw from a generator
seeded with it, so that an item is the same whichever worker process loads it, and a resumed run sees the same
flips, sizes and augmentations as an uninterrupted one.

Legend for shapes: B batch, N boxes, H, W image size.
"""

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .boxes import clip_boxes, has_area
from .transforms import MEAN_COLOUR, DetectionTransform, Target, Transform

PADDING_ROW = -1.0  # value of the annotation rows that collate adds; the loss skips rows with class < 0


# -------------------------------------------------------------------------------------------------- items


class DetectionDataset(Dataset):
    """What every dataset shares: one image and its (N, 5) annotations in original pixels per index, (N,) difficult
    flags (none by default), class names, and `__getitem__`, which reads, clips, transforms and returns the item dict
    described in the module docstring. A dataset reads its images with `read_image` and `image_size`
    (data/datasets.py: ImageFileDataset reads image files)."""

    use_07_metric = False  # the AP its benchmark reports: VOC2007's test set is scored with the 11-point AP

    def __init__(
        self,
        image_paths: list[str],
        annotations: list[np.ndarray],
        class_names: list[str],
        transform: Transform | None = None,
        difficult: list[np.ndarray] | None = None,
    ):
        self.image_paths = image_paths
        self.annotations = annotations
        self.difficult = difficult if difficult is not None else [np.zeros(len(boxes), bool) for boxes in annotations]
        self.class_names = class_names
        self.transform = transform if transform is not None else DetectionTransform()  # None: as the file is

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_paths)

    def image_path(self, index: int) -> str:
        """Path of the image of item `index`, which names it in messages."""
        return self.image_paths[index]

    def read_image(self, index: int) -> torch.Tensor:
        """The image of item `index` as a (3, H, W) uint8 RGB tensor."""
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image of item `index`."""
        raise NotImplementedError

    def load_annotations(self, index: int) -> np.ndarray:
        """(N, 5) float32 rows x1, y1, x2, y2, class index, in pixels of the image file, as annotated."""
        return self.annotations[index].copy()

    def load_difficult(self, index: int) -> np.ndarray:
        """(N,) bool: which boxes of load_annotations(index) evaluation neither counts as hits nor as misses."""
        return self.difficult[index].copy()

    def aspect_ratio(self, index: int) -> float:
        """Width / height of the image."""
        height, width = self.image_size(index)
        return width / height

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """The item of an index, or of (index, seed) with its random transforms seeded (see the module docstring)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.image_paths[index]
        image = self.read_image(index)  # (3, H, W) uint8
        height, width = image.shape[1:]
        annotations, keep = clip_to_image(torch.from_numpy(self.annotations[index]), height, width)  # (N, 5), (N,)
        if not keep.all():
            warnings.warn(f"{path}: dropped {int((~keep).sum())} box(es) lying outside the {width}x{height} image",
                          stacklevel=2)
        target = {"boxes": annotations[keep, :4], "labels": annotations[keep, 4].long(),
                  "difficult": torch.from_numpy(self.difficult[index])[keep]}
        with seeded_random(seed):
            image, target, scale = self.transform(image, target)
        annotations, difficult = inside_image(image, target, path)
        return {
            "image": image,
            "annotations": annotations,
            "difficult": difficult,
            "scale": float(scale),
            "index": index,
            "original_size": (height, width),
        }


def clip_to_image(annotations: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) annotations with their boxes clipped to a height x width image, and the (N,) mask of those that keep
    some area: the rule for every box of an annotation file and of an augmentation."""
    boxes = clip_boxes(annotations[:, :4], height, width)  # (N, 4)
    return torch.cat([boxes, annotations[:, 4:]], dim=1), has_area(boxes)  # (N, 4) + (N, 1) -> (N, 5)


def inside_image(image: torch.Tensor, target: Target, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A transform's output as an item's (N, 5) annotations and (N,) difficult flags: boxes clipped to the image,
    those left without area dropped with their labels and flags, as for boxes of an annotation file."""
    boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
    if image.dtype != torch.uint8 or boxes.shape != (len(labels), 4) or difficult.shape != labels.shape:
        raise ValueError(f"{path}: transform returned a {image.dtype} image, boxes of shape {tuple(boxes.shape)}, "
                         f"{len(labels)} labels and {len(difficult)} difficult flags; a transform must return a uint8 "
                         f"image and one label and one flag per box, in the order of the boxes")
    rows = torch.cat([boxes.float(), labels[:, None].float()], dim=1)  # (N, 4) + (N, 1) -> (N, 5)
    clipped, keep = clip_to_image(rows, *image.shape[1:])
    return clipped[keep], difficult[keep]


@contextlib.contextmanager
def seeded_random(seed: int | None) -> Iterator[None]:
    """Inside, torch's random numbers come from `seed` (if not None); outside, they continue as before."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of an item's random transforms in an epoch of a run: a function of the three alone."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# -------------------------------------------------------------------------------------------------- batching


def collate(batch: list[dict], size_divisible: int = 32) -> dict:
    """Stack dataset items into a batch: uint8 images padded at the bottom and right to a common size with the mean
    colour, which the model's normalisation takes to about 0 (as padding after normalising would be), annotations
    padded with rows of -1 to the largest box count.

    Returns {"images": (B, 3, Hp, Wp) uint8, "annotations": (B, Nmax, 5), "difficult": (B, Nmax) bool (False on
    padding rows), "scales": (B,), "image_sizes": (B, 2) height and width of each image inside the padded batch,
    "indices": list of B ints, "original_sizes": list of B (height, width) of the image files}.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    # Multiples of 32: C3..C5 (strides 8, 16, 32) then tile the padded image exactly, so that each upsampled cell
    # of FPN's top-down path lies on the 2x2 lateral cells it is added to; P6 and P7 (strides 64, 128) round up.
    padded_height = math.ceil(max(item["image"].shape[1] for item in batch) / size_divisible) * size_divisible
    padded_width = math.ceil(max(item["image"].shape[2] for item in batch) / size_divisible) * size_divisible
    max_boxes = max(item["annotations"].shape[0] for item in batch)
    images = torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(1, 3, 1, 1).repeat(
        len(batch), 1, padded_height, padded_width)  # (B, 3, Hp, Wp)
    annotations = torch.full((len(batch), max_boxes, 5), PADDING_ROW)  # (B, Nmax, 5)
    difficult = torch.zeros(len(batch), max_boxes, dtype=torch.bool)  # (B, Nmax)
    for i, item in enumerate(batch):
        _, height, width = item["image"].shape
        images[i, :, :height, :width] = item["image"]  # (3, H, W) into the top-left of (3, Hp, Wp)
        annotations[i, : len(item["annotations"])] = item["annotations"]  # (N, 5) into the top of (Nmax, 5)
        difficult[i, : len(item["difficult"])] = item["difficult"]  # (N,) into the start of (Nmax,)
    return {
        "images": images,
        "annotations": annotations,
        "difficult": difficult,
        "scales": torch.tensor([item["scale"] for item in batch], dtype=torch.float32),  # (B,)
        "image_sizes": torch.tensor([item["image"].shape[1:] for item in batch]),  # (B, 2): each (H, W) unpadded
        "indices": [item["index"] for item in batch],
        "original_sizes": [item["original_size"] for item in batch],
    }


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images share one orientation (landscape, width >= height, or portrait), as
    detectron2's aspect ratio grouping: fill one bucket per orientation in (shuffled) order, emit a bucket when
    full; what is left at the end of the epoch becomes a smaller batch unless drop_last.

    Distributed (num_replicas > 1): every rank builds the same batches from the same seed + epoch and takes every
    num_replicas-th one, so the ranks' batches are disjoint and together hold each image once per epoch. The list
    of batches is padded by repeating batches from its start (as DistributedSampler repeats indices) so that
    every rank yields the same number of batches: a rank with fewer batches would leave the others waiting in
    their gradient all-reduce.

    With seed_items, each batch holds (index, item_seed) pairs, for DetectionDataset's seeded transforms.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        seed_items: bool = False,
    ):
        super().__init__()
        if len(aspect_ratios) == 0:
            raise ValueError("AspectRatioBatchSampler needs at least one aspect ratio")
        if not all(math.isfinite(ratio) and ratio > 0 for ratio in aspect_ratios):
            raise ValueError("aspect ratios must be finite and positive (width / height)")
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < num_replicas, got batch_size={batch_size}, "
                             f"rank={rank}, num_replicas={num_replicas}")
        self.is_landscape = [ratio >= 1.0 for ratio in aspect_ratios]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.seed_items = seed_items
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Shuffle with seed + epoch from now on, beginning at this rank's batch `start` of the epoch (a resumed
        run skips those it has trained on); call it at the start of every epoch."""
        self.epoch = epoch
        self.start = start

    def _grouped_batches(self) -> list[list[int]]:
        """All batches of the epoch, over all ranks."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.is_landscape), generator=generator).tolist()
        else:
            order = range(len(self.is_landscape))
        buckets: tuple[list[int], list[int]] = ([], [])  # portrait, landscape
        batches = []
        for index in order:
            bucket = buckets[self.is_landscape[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        if not self.drop_last:
            batches += [bucket for bucket in buckets if bucket]
        return batches

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        batches = self._grouped_batches()
        total = len(self) * self.num_replicas  # drop_last cuts the tail, otherwise repeat from the start
        batches = list(itertools.islice(itertools.cycle(batches), total))[self.rank :: self.num_replicas]
        for batch in batches[self.start :]:
            yield [(index, item_seed(self.seed, self.epoch, index)) for index in batch] if self.seed_items else batch

    def __len__(self) -> int:
        """The number of batches this rank yields per epoch."""
        num_landscape = sum(self.is_landscape)
        counts = (num_landscape, len(self.is_landscape) - num_landscape)
        if self.drop_last:
            return sum(count // self.batch_size for count in counts) // self.num_replicas
        return math.ceil(sum(math.ceil(count / self.batch_size) for count in counts) / self.num_replicas)


def aspect_ratios(dataset) -> list[float]:
    """Width / height of every image of `dataset` (anything with len() and aspect_ratio(index)), in its order:
    what AspectRatioBatchSampler groups by."""
    return [dataset.aspect_ratio(index) for index in range(len(dataset))]


def training_loader(dataset: DetectionDataset, batch_size: int, workers: int = 0, seed: int = 0, rank: int = 0,
                    world_size: int = 1, pin_memory: bool = False) -> tuple[AspectRatioBatchSampler, DataLoader]:
    """What train.py's loop iterates over: batches of one orientation, shuffled from `seed` and the epoch (set it
    with sampler.set_epoch), each item with its own seed for the random transforms; with world_size > 1, the
    share of process `rank`. Returns the sampler and the loader."""
    sampler = AspectRatioBatchSampler(aspect_ratios(dataset), batch_size, shuffle=True, num_replicas=world_size,
                                      rank=rank, seed=seed, seed_items=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0)
    return sampler, loader
