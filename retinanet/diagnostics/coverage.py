"""Anchor coverage (paper §4 "Anchors"): how many ground-truth boxes have an anchor they are assigned to, at the
image size training resizes to.

"anchors are assigned to ground-truth object boxes using an intersection-over-union (IoU) threshold of 0.5" (§4):
a box whose best anchor overlaps it less than that gets no foreground anchor from that threshold. With low-quality
matches (settings.py, on by default as in detectron2 and torchvision) it still gets its best anchors, below 0.5;
without them, none. The paper's anchors (areas 32² to 512², ratios 1:2, 1:1, 2:1) cover COCO's objects at 800
pixels; small, thin or large objects of other data may not be covered, and are then learnt from low-quality
matches alone, or not at all.

Each box is measured alone in its image, resized as transforms.Resize resizes it. The anchor of a given shape that
overlaps a box most is the one centred nearest the box's centre (the overlap of two boxes of fixed sizes only
shrinks as their centres move apart), so each box needs the A anchors of one cell per level, not all R anchors.

Legend for shapes: G boxes, S image sizes (the shorter sides of a jitter range), L pyramid levels, A anchors per
location.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..anchors import Anchors, batched_box_iou
from ..dataloader import Resize
from ..settings import ModelSettings

JITTER_SIZES = 5  # shorter sides measured over a --jitter range, evenly spaced: its draws are uniform
WARNING_COVERAGE = 0.90  # below this share of covered boxes, the report warns
PERCENTILES = (5, 50, 95)


def nearest_cells(boxes: torch.Tensor, image_sizes: torch.Tensor, anchors: Anchors) -> Iterator[tuple]:
    """For (G, 4) boxes in the pixels of their (G, 2) resized images (height, width), per pyramid level, P3 first:
    the (A, 4) anchors of cell (0, 0) (the one cell of a 1 x 1 image) and the (G, 4) shifts x, y, x, y, whole
    cells, that move them to the cell whose centre is nearest each box's centre. That cell is one of the image's
    own, ceil(size / stride) per side (anchors.grid_size); a batch padded past the image can only add cells beyond
    it, which with the default centre_offset 0.5 are never nearer."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2) x, y
    widths_heights = image_sizes.flip(-1).to(boxes.dtype)  # (G, 2)
    for cell_anchors, stride in zip(anchors.per_level(1, 1), anchors.strides):  # (A, 4) each
        last_cell = torch.ceil(widths_heights / stride) - 1  # (G, 2) column, row
        cell = (centres / stride - anchors.settings.anchor_centre_offset).round().clamp(min=0).minimum(last_cell)  # (G, 2)
        yield cell_anchors.to(boxes), (cell * stride).repeat(1, 2)  # (A, 4), (G, 2) -> (G, 4)


def level_ious(boxes: torch.Tensor, image_sizes: torch.Tensor, anchors: Anchors) -> torch.Tensor:
    """(L, G, A): the IoU of each box with each of the A anchors (ratio major, scale minor, as anchors.py orders
    them) of its nearest cell on each level; each box is moved to cell (0, 0) rather than the anchors to it."""
    return cell_ious(boxes, list(nearest_cells(boxes, image_sizes, anchors)))


def cell_ious(boxes: torch.Tensor, cells: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """level_ious from nearest_cells' (A, 4) anchors and (G, 4) shifts of each level: (L, G, A)."""
    return torch.stack([
        batched_box_iou((boxes - shifts)[:, None], cell_anchors)[:, 0]  # (G, 1, 4) with (A, 4) -> (G, 1, A) -> (G, A)
        for cell_anchors, shifts in cells
    ])  # L x (G, A) -> (L, G, A)


def best_anchors(boxes: torch.Tensor, image_sizes: torch.Tensor, anchors: Anchors) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor that overlaps each of the (G, 4) boxes most: its IoU (G,) and the anchor (G, 4)."""
    cells = list(nearest_cells(boxes, image_sizes, anchors))  # L x ((A, 4), (G, 4))
    ious = cell_ious(boxes, cells)  # (L, G, A)
    best_iou, best = ious.permute(1, 0, 2).flatten(1).max(dim=1)  # (G, L, A) -> (G, L*A) -> (G,)
    level, shape = best // anchors.num_anchors, best % anchors.num_anchors  # (G,) each
    cell_anchors, shifts = zip(*cells)  # L x (A, 4), L x (G, 4)
    box_index = torch.arange(len(boxes))
    return best_iou, torch.stack(cell_anchors)[level, shape] + torch.stack(shifts)[level, box_index]  # (G, 4)


def shorter_sides(min_size: int, jitter: tuple[int, int] | None = None) -> list[int]:
    """The shorter sides training resizes to: min_size, or JITTER_SIZES sides spread evenly over the jitter range."""
    if jitter is None:
        return [min_size]
    low, high = jitter
    return sorted({round(low + (high - low) * k / (JITTER_SIZES - 1)) for k in range(JITTER_SIZES)})


def resize_scales(image_sizes: torch.Tensor, shorter_side: int, max_size: int) -> torch.Tensor:
    """(G,) float64: the factor transforms.Resize resizes each of the (G, 2) images (height, width) by."""
    resize = Resize(shorter_side, max_size)
    unique_sizes, image_of_box = torch.unique(image_sizes, dim=0, return_inverse=True)
    scales = [resize.scale_for(height, width) for height, width in unique_sizes.tolist()]
    return torch.tensor(scales, dtype=torch.float64)[image_of_box]


def training_sizes(boxes: torch.Tensor, image_sizes: torch.Tensor, settings: ModelSettings,
                   jitter: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For (G, 4) boxes in the pixels of their (G, 2) images (height, width), both after each resize of training,
    one per shorter side (shorter_sides): (G, 4) float32 boxes, (G, 2) image sizes rounded as Resize rounds them."""
    for shorter_side in shorter_sides(settings.min_size, jitter):
        scales = resize_scales(image_sizes, shorter_side, settings.max_size)[:, None]  # (G, 1)
        yield (boxes * scales).float(), (image_sizes * scales).round().long()


def box_tensors(boxes: np.ndarray | torch.Tensor, image_sizes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(G, 4) boxes as float64 and the (G, 2) sizes of their images as int64, checked."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    image_sizes = torch.as_tensor(image_sizes, dtype=torch.long).reshape(-1, 2)
    if len(image_sizes) != len(boxes):
        raise ValueError(f"need one image size per box, got {len(boxes)} boxes and {len(image_sizes)} image sizes")
    if not bool((boxes[:, 2:] > boxes[:, :2]).all()):
        raise ValueError("every box needs x2 > x1 and y2 > y1")
    return boxes, image_sizes


@dataclass(frozen=True)
class Coverage:
    """Every box's best anchor at each image size of training, and the settings that decide what it means."""

    best_iou: torch.Tensor  # (S, G) IoU of each box's best anchor at each shorter side
    sides: torch.Tensor  # (S, G) sqrt(width * height) of each box after resizing, in pixels
    ratios: torch.Tensor  # (G,) height / width of each box
    labels: torch.Tensor  # (G,) class index of each box
    settings: ModelSettings
    shorter_sides: tuple[int, ...]

    def covered(self) -> torch.Tensor:
        """(S, G) bool: the box has an anchor of IoU >= fg_iou, a foreground anchor by the 0.5 threshold of §4 "Anchors"."""
        return self.best_iou >= self.settings.fg_iou

    def low_quality_only(self) -> torch.Tensor:
        """(S, G) bool: the box gets an anchor only through a low-quality match, below fg_iou (losses.py)."""
        return ~self.covered() & (self.best_iou > 0) & self.settings.allow_low_quality_matches

    def share(self, where: torch.Tensor, boxes: torch.Tensor | None = None) -> float:
        """The share of the boxes (a (G,) mask; all by default) and image sizes where `where` (S, G) holds."""
        selected = where if boxes is None else where[:, boxes]
        return float(selected.double().mean()) if selected.numel() else float("nan")


def anchor_coverage(
    boxes: np.ndarray | torch.Tensor,
    image_sizes: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    settings: ModelSettings,
    jitter: tuple[int, int] | None = None,
) -> Coverage:
    """How the anchors of `settings` cover (G, 4) boxes x1y1x2y2 in the pixels of their images, whose (G, 2)
    sizes (height, width) and (G,) class indices (None: all 0) are given, at the image size training uses: the
    settings' min_size and max_size, or the shorter sides of a jitter range (lo, hi)."""
    boxes, image_sizes = box_tensors(boxes, image_sizes)
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
    if labels.shape != (len(boxes),):
        raise ValueError(f"need one label per box, got {len(boxes)} boxes and labels of shape {tuple(labels.shape)}")
    anchors = Anchors(settings)
    best_iou, box_sides = [], []
    for resized, resized_sizes in training_sizes(boxes, image_sizes, settings, jitter):
        best_iou.append(level_ious(resized, resized_sizes, anchors).amax(dim=(0, 2)))  # (L, G, A) -> (G,)
        box_sides.append((resized[:, 2:] - resized[:, :2]).prod(dim=1).sqrt())  # (G,)
    ratios = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])
    return Coverage(torch.stack(best_iou), torch.stack(box_sides), ratios.float(), labels, settings,
                    tuple(shorter_sides(settings.min_size, jitter)))


# ---------------------------------------------------------------------------------------------------- the report


def describe_training_size(settings: ModelSettings, jitter: tuple[int, int] | None = None) -> str:
    """The image size training resizes to, in words."""
    shorter = f"{jitter[0]}..{jitter[1]} (--jitter)" if jitter else str(settings.min_size)
    return f"shorter side {shorter}, longer side at most {settings.max_size}"


def describe_anchors(settings: ModelSettings) -> str:
    """The anchors of `settings`, in words."""
    def numbers(values):
        return " ".join(f"{value:.4g}" for value in values)

    return (f"{settings.num_anchors} per location: sizes {numbers(settings.anchor_sizes)} on P3..P7, scales "
            f"{numbers(settings.anchor_scales)}, ratios (height / width) {numbers(settings.anchor_ratios)}")


def coverage_row(name: str, coverage: Coverage, boxes: torch.Tensor | None = None) -> str:
    """One line of the report: the boxes of a class (a (G,) mask; all by default), their sizes after resizing and
    shapes (percentiles), and the shares covered, covered only by low-quality matches, and not at all."""
    sides = (coverage.sides if boxes is None else coverage.sides[:, boxes]).flatten().numpy()
    ratios = (coverage.ratios if boxes is None else coverage.ratios[boxes]).numpy()
    covered = coverage.share(coverage.covered(), boxes)
    low_quality = coverage.share(coverage.low_quality_only(), boxes)
    no_anchor = coverage.share(~coverage.covered() & ~coverage.low_quality_only(), boxes)  # counted: never "-0.0%"
    side_percentiles = " / ".join(f"{value:.0f}" for value in np.percentile(sides, PERCENTILES))
    ratio_range = " / ".join(f"{value:.2f}" for value in np.percentile(ratios, (PERCENTILES[0], PERCENTILES[-1])))
    return (f"{name[:20]:<20} {len(ratios):>8} {side_percentiles:>18} {ratio_range:>13} {covered:>10.1%} "
            f"{low_quality:>17.1%} {no_anchor:>10.1%}")


def coverage_warning(coverage: Coverage) -> str:
    """What the boxes without an anchor of IoU >= fg_iou have in common, and the flags to try."""
    settings = coverage.settings
    uncovered = ~coverage.covered()  # (S, G)
    smallest = min(settings.anchor_sizes) * min(settings.anchor_scales)
    largest = max(settings.anchor_sizes) * max(settings.anchor_scales)
    low, high = min(settings.anchor_ratios), max(settings.anchor_ratios)
    thin = (coverage.ratios < low) | (coverage.ratios > high)  # (G,)
    share_uncovered = coverage.share(uncovered)
    small, large, elongated = (coverage.share(uncovered & where) / share_uncovered for where in
                               (coverage.sides < smallest, coverage.sides > largest, thin.expand_as(uncovered)))
    return (f"warning: only {1 - share_uncovered:.1%} of the boxes have an anchor with IoU >= {settings.fg_iou:g} "
            f"(below {WARNING_COVERAGE:.0%}). Of the others, {small:.0%} are smaller than the smallest anchor "
            f"({smallest:.4g} px), {large:.0%} larger than the largest ({largest:.4g} px), {elongated:.0%} more "
            f"elongated than its ratios (height / width {low:g} to {high:g}). Try --fit_anchors (it fits "
            f"--anchor_scales and --anchor_ratios to these boxes), a larger --min_size and --max_size (small objects "
            f"grow with the image), or other --anchor_sizes.")


def coverage_report(coverage: Coverage, class_names: list[str], jitter: tuple[int, int] | None = None) -> str:
    """The report of train.py --check_data: image size and anchors, a table of all boxes and of each class, the
    summary line `anchor coverage: NN.N% of M boxes have an anchor with IoU >= 0.5`, and a warning below
    WARNING_COVERAGE."""
    settings, count = coverage.settings, len(coverage.labels)
    lines = [f"anchors: {describe_anchors(settings)}",
             f"coverage of the training boxes at the training image size ({describe_training_size(settings, jitter)}): "
             f"a box is covered by an anchor of IoU >= {settings.fg_iou:g} (§4 \"Anchors\")"]
    if count == 0:
        return "\n".join(lines + ["anchor coverage: no boxes in the training set"])
    lines.append(f"{'class':<20} {'boxes':>8} {'size p5/p50/p95':>18} {'h/w p5/p95':>13} {'IoU >= ' + format(settings.fg_iou, 'g'):>10} "
                 f"{'low-quality only':>17} {'no anchor':>10}")
    lines.append(coverage_row("all", coverage))
    for label, name in enumerate(class_names):
        if bool((coverage.labels == label).any()):
            lines.append(coverage_row(name, coverage, coverage.labels == label))
    share = coverage.share(coverage.covered())
    lines.append(f"anchor coverage: {100 * share:.1f}% of {count} boxes have an anchor with IoU >= {settings.fg_iou:g}")
    if share < WARNING_COVERAGE:
        lines.append(coverage_warning(coverage))
    return "\n".join(lines)

