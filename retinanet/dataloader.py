"""Detection datasets (CSV, COCO and Pascal VOC), batching and aspect-ratio grouping: the minibatches of images that
paper §4.1 "Optimization" trains on. A dataset reads each image (retinanet.data.images) and its boxes
(retinanet.data.annotations, retinanet.data.voc) and passes both through the transforms of §4.1 (retinanet.transforms).
Batches hold images of one orientation only (landscape or portrait), as in detectron2's aspect ratio grouping, so
that little of a padded batch is padding.

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
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.annotations import MAX_LISTED, clip_annotations, clip_to_image, load_coco, read_class_list, read_csv_annotations
from .data.images import read_image_size, read_rgb_image
from .transforms import MEAN_COLOUR, DetectionTransform, Target, Transform
from .data.voc import ParsedVOC, VOCSet, boxes_of_files, found_class_names, is_voc2007_test, read_voc_set

PADDING_ROW = -1.0  # value of the annotation rows that collate adds; the loss skips rows with class < 0


# -------------------------------------------------------------------------------------------------- datasets


def _raise_if_missing(source: str, paths: Sequence[str], where: Sequence[str]) -> None:
    """Fail at construction, not hours into training, if image files are missing; list the first few."""
    missing = [f"{place}: {path}" for path, place in zip(paths, where) if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(paths)} image files not found, e.g. " + "; ".join(missing[:MAX_LISTED])
        )


def _raise_first(errors: Sequence[ValueError], what: str) -> None:
    """Raise the first of the errors found reading annotations, saying how many more there are."""
    if errors:
        more = len(errors) - 1
        hint = f" (and {more} more {what}: train.py --check_data lists them all)" if more else ""
        raise ValueError(f"{errors[0]}{hint}") from errors[0]


class DetectionDataset(Dataset):
    """What every dataset here shares: image paths, (N, 5) annotations in original pixels, (N,) difficult flags
    (none by default), class names, and `__getitem__`, which reads, clips, transforms and returns the item dict
    described in the module docstring."""

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
        """Path of the image file of item `index`."""
        return self.image_paths[index]

    def load_annotations(self, index: int) -> np.ndarray:
        """(N, 5) float32 rows x1, y1, x2, y2, class index, in pixels of the image file, as annotated."""
        return self.annotations[index].copy()

    def load_difficult(self, index: int) -> np.ndarray:
        """(N,) bool: which boxes of load_annotations(index) evaluation neither counts as hits nor as misses."""
        return self.difficult[index].copy()

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image file, read from its header."""
        return read_image_size(self.image_paths[index])

    def aspect_ratio(self, index: int) -> float:
        """Width / height of the image file."""
        height, width = self.image_size(index)
        return width / height

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """The item of an index, or of (index, seed) with its random transforms seeded (see the module docstring)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.image_paths[index]
        image = read_rgb_image(path)  # (3, H, W) uint8
        height, width = image.shape[1:]
        annotations, keep = clip_annotations(self.annotations[index], height, width, path)  # (N, 5), (N_file,)
        target = {"boxes": torch.from_numpy(annotations[:, :4]), "labels": torch.from_numpy(annotations[:, 4]).long(),
                  "difficult": torch.from_numpy(self.difficult[index][keep])}
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


def inside_image(image: torch.Tensor, target: Target, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A transform's output as an item's (N, 5) annotations and (N,) difficult flags: boxes clipped to the image,
    those left without area dropped with their labels and flags, as for boxes of an annotation file."""
    boxes, labels, difficult = target["boxes"], target["labels"], target["difficult"]
    if image.dtype != torch.uint8 or boxes.shape != (len(labels), 4) or difficult.shape != labels.shape:
        raise ValueError(f"{path}: transform returned a {image.dtype} image, boxes of shape {tuple(boxes.shape)}, "
                         f"{len(labels)} labels and {len(difficult)} difficult flags; a transform must return a uint8 "
                         f"image and one label and one flag per box, in the order of the boxes")
    rows = torch.cat([boxes.float(), labels[:, None].float()], dim=1).numpy()  # (N, 4) + (N, 1) -> (N, 5)
    clipped, keep = clip_to_image(rows, *image.shape[1:])
    return torch.from_numpy(clipped[keep]), difficult[torch.from_numpy(keep)]


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


class CSVDataset(DetectionDataset):
    """Boxes from a CSV file in yhenon/pytorch-retinanet's format.

    train_file rows: `path,x1,y1,x2,y2,class_name`, several rows per image, `path,,,,,` for an image without
    objects; relative paths are relative to the CSV file's folder. class_list rows: `class_name,id`, ids 0..K-1.
    Neither file has a header. Malformed rows raise ValueError naming the file and line.
    """

    def __init__(self, train_file: str, class_list: str, transform: Transform | None = None):
        class_names = read_class_list(class_list)
        parsed = read_csv_annotations(train_file, class_names)
        _raise_first(parsed.errors, "malformed row(s)")
        image_paths = list(parsed.boxes_of_image)
        _raise_if_missing(train_file, image_paths, [f"line {parsed.first_line[path]}" for path in image_paths])
        annotations = [np.array(boxes, dtype=np.float32).reshape(-1, 5) for boxes in parsed.boxes_of_image.values()]
        super().__init__(image_paths, annotations, class_names, transform)


class CocoDataset(DetectionDataset):
    """Boxes from `{root}/annotations/instances_{set_name}.json`, images from `{root}/images/{set_name}/` or
    `{root}/{set_name}/`. COCO category ids (sorted) map to class indices 0..K-1 and back. Crowd boxes are
    skipped, zero-area boxes dropped with a warning, images without boxes kept as negatives. Missing image files
    raise ValueError unless check_files is False (retinanet.diagnostics.check then reports each one)."""

    def __init__(self, root: str, set_name: str, transform: Transform | None = None, check_files: bool = True):
        annotation_file = os.path.join(root, "annotations", f"instances_{set_name}.json")
        self.annotation_file = annotation_file  # problems found later (retinanet.diagnostics.check) name it
        self.coco = load_coco(annotation_file)
        image_dirs = [os.path.join(root, "images", set_name), os.path.join(root, set_name)]
        image_dir = next((folder for folder in image_dirs if os.path.isdir(folder)), None)
        if image_dir is None:
            raise ValueError(f"{root}: no image folder for {set_name!r}; expected {' or '.join(image_dirs)}")
        category_ids = sorted(self.coco.cats)
        self.coco_id_to_label = {coco_id: label for label, coco_id in enumerate(category_ids)}
        self.label_to_coco_id = {label: coco_id for coco_id, label in self.coco_id_to_label.items()}
        self.image_ids = sorted(self.coco.imgs)  # dataset index -> COCO image id
        image_paths = [os.path.join(image_dir, self.coco.imgs[image_id]["file_name"]) for image_id in self.image_ids]
        if check_files:
            _raise_if_missing(annotation_file, image_paths, [f"image id {image_id}" for image_id in self.image_ids])
        zero_area: list[int] = []
        annotations = [self._boxes_of_image(image_id, annotation_file, zero_area) for image_id in self.image_ids]
        if zero_area:
            warnings.warn(f"{annotation_file}: dropped {len(zero_area)} zero-area box(es), annotation ids "
                          f"{zero_area[:MAX_LISTED]}", stacklevel=2)
        class_names = [self.coco.cats[coco_id]["name"] for coco_id in category_ids]
        super().__init__(image_paths, annotations, class_names, transform)

    def _boxes_of_image(self, image_id: int, annotation_file: str, zero_area: list[int]) -> np.ndarray:
        """(N, 5) x1, y1, x2, y2, class index of the image's non-crowd boxes; appends zero-area ids to zero_area."""
        rows = []
        for annotation in self.coco.imgToAnns[image_id]:
            if annotation.get("iscrowd", 0):
                continue
            if annotation["category_id"] not in self.coco_id_to_label:
                raise ValueError(f"{annotation_file}: annotation {annotation['id']} has category_id "
                                 f"{annotation['category_id']}, which is not in 'categories'")
            x, y, width, height = annotation["bbox"]
            if width <= 0 or height <= 0:
                zero_area.append(annotation["id"])
                continue
            rows.append([x, y, x + width, y + height, self.coco_id_to_label[annotation["category_id"]]])
        return np.array(rows, dtype=np.float32).reshape(-1, 5)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the COCO json."""
        image_info = self.coco.imgs[self.image_ids[index]]
        return image_info["height"], image_info["width"]


class VOCDataset(DetectionDataset):
    """Boxes from the Pascal VOC XML files of set `set_name` of one or more roots: VOC roots (e.g.
    VOCdevkit/VOC2007, VOCdevkit/VOC2012) or folders of XML files next to their images (retinanet.data.voc). Classes:
    `class_names` if given, else VOC's 20 when every name found is one of them, else the sorted names found
    (train.py gives those of its training and validation sets: retinanet.data.voc.run_class_names).
    Difficult boxes train as any other; evaluation neither counts them as hits nor as misses, with the 11-point AP
    on VOC2007's test set. Malformed files and objects, unknown classes and missing images raise ValueError naming
    the file and the line. `parsed` is the set as read_voc_set returns it, where the caller has read it already."""

    def __init__(self, roots: Sequence[str], set_name: str, class_names: list[str] | None = None,
                 transform: Transform | None = None, parsed: ParsedVOC | None = None):
        voc_set = VOCSet(tuple(roots), set_name)
        parsed = read_voc_set(voc_set) if parsed is None else parsed
        class_names = list(class_names) if class_names is not None else found_class_names(parsed.files)
        boxes = boxes_of_files(parsed.files, class_names)
        _raise_first(parsed.errors + boxes.errors, "problem(s)")
        image_paths = [file.image_path for file in parsed.files]
        _raise_if_missing(f"VOC set {set_name!r}", image_paths, [file.xml_path for file in parsed.files])
        super().__init__(image_paths, boxes.annotations, class_names, transform, boxes.difficult)
        self.use_07_metric = is_voc2007_test(voc_set)


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
