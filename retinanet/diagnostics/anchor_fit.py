"""Anchor scales and ratios fitted to a dataset's boxes (paper §4 "Anchors"). The paper's scales {2^0, 2^(1/3),
2^(2/3)} and ratios {1:2, 1:1, 2:1} suit COCO's objects at 800 pixels (§5.2 "Anchor Density" compares other sets on
COCO); this finds, for other data, the scales and ratios, as many as the settings have, that give the most boxes an
anchor of IoU >= 0.5 at the training image size, and, where no scales and ratios can, the larger image size that can.

The search: the IoU of each box with its best anchor of every candidate scale and ratio (a grid, plus the settings'
own) is computed once, on a sample of the boxes (coverage.level_ious). Coordinate ascent then replaces one scale or
one ratio at a time by the candidate that covers most boxes (ties: the higher mean IoU, counted up to 0.5), starting
from the settings' own, until no change helps; the result never covers fewer sampled boxes than the start.

Legend for shapes: N sampled boxes (times the image sizes of a jitter range), C candidates.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..anchors import Anchors
from ..settings import ModelSettings
from .coverage import anchor_coverage, box_tensors, describe_training_size, level_ious, shorter_sides, training_sizes

# Rounded to 3 decimals, so that the flags printed give exactly the anchors measured
CANDIDATE_SCALES = tuple(round(2 ** (k / 6), 3) for k in range(-12, 13))  # 1/4 to 4 in sixths of an octave
CANDIDATE_RATIOS = tuple(round(2 ** (k / 3), 3) for k in range(-9, 10))  # 1/8 to 8 in thirds of an octave
FIT_SAMPLE = 4000  # (box, image size) pairs the search measures; coverage before and after is measured on all
MAX_ROUNDS = 10  # of coordinate ascent; it usually settles in 2 to 4
TARGET_COVERAGE = 0.95  # below this after the fit, larger images are tried
UPSCALE_FACTORS = (1.25, 1.5, 2, 2.5, 3, 4)  # image sizes tried, times the settings' min_size and max_size


@dataclass(frozen=True)
class AnchorFit:
    """Fitted settings (scales, ratios and, when larger images were needed, min_size and max_size) and the share
    of the boxes they cover, with the share the starting settings cover at the same image size."""

    settings: ModelSettings
    jitter: tuple[int, int] | None
    coverage: float
    coverage_before: float


def candidate_ious(boxes: torch.Tensor, image_sizes: torch.Tensor, settings: ModelSettings,
                   jitter: tuple[int, int] | None, scales: list[float], ratios: list[float]) -> torch.Tensor:
    """(N, C_ratios, C_scales): for each box at each image size of training, the IoU of its best anchor of each
    candidate ratio and scale, over the pyramid levels."""
    candidates = Anchors(settings.replace(anchor_scales=scales, anchor_ratios=ratios))
    ious = [level_ious(resized, sizes, candidates).amax(dim=0)  # (L, G, C_ratios * C_scales) -> (G, C_r * C_s)
            for resized, sizes in training_sizes(boxes, image_sizes, settings, jitter)]
    return torch.cat(ious).view(-1, len(ratios), len(scales))  # S x (G, C_r*C_s) -> (N, C_r, C_s)


def fit_score(best_iou: torch.Tensor, fg_iou: float) -> torch.Tensor:
    """(C,) score of each candidate from the (N, C) IoU of each box's best anchor with it: the count of boxes
    covered, then, below one box, the mean IoU counted up to fg_iou (it breaks ties towards the threshold)."""
    return (best_iou >= fg_iou).sum(dim=0) + 0.5 * best_iou.clamp(max=fg_iou).mean(dim=0) / fg_iou


def improve(table: torch.Tensor, rows: list[int], columns: list[int], fg_iou: float) -> list[int]:
    """One pass of coordinate ascent over `columns` (indices into the last axis of the (N, R, C) table, with the
    `rows` of its middle axis held): each column in turn becomes the one that scores best with the others."""
    columns = list(columns)
    of_rows = table[:, rows].amax(dim=1)  # (N, len(rows), C) -> (N, C)
    for slot, current in enumerate(columns):
        others = columns[:slot] + columns[slot + 1:]
        held = of_rows[:, others].amax(dim=1, keepdim=True) if others else of_rows.new_zeros(len(table), 1)  # (N, 1)
        scores = fit_score(torch.maximum(of_rows, held), fg_iou)  # (C,)
        if scores[current] < scores.max():  # a tie keeps the current one: no cycling between equals
            columns[slot] = int(scores.argmax())
    return columns


def search(table: torch.Tensor, ratio_indices: list[int], scale_indices: list[int], fg_iou: float) -> tuple:
    """Coordinate ascent over the (N, C_ratios, C_scales) table from the given ratios and scales (indices): scales,
    then ratios, until a round changes nothing. Returns the ratio and scale indices."""
    for _ in range(MAX_ROUNDS):
        new_scales = improve(table, ratio_indices, scale_indices, fg_iou)
        new_ratios = improve(table.transpose(1, 2), new_scales, ratio_indices, fg_iou)
        if (new_ratios, new_scales) == (ratio_indices, scale_indices):
            break
        ratio_indices, scale_indices = new_ratios, new_scales
    return ratio_indices, scale_indices


def fit_at_size(boxes: torch.Tensor, image_sizes: torch.Tensor, settings: ModelSettings,
                jitter: tuple[int, int] | None) -> tuple[ModelSettings, float]:
    """The settings with the scales and ratios that cover most of the given boxes (a sample) at the settings'
    image size, and the share of them covered."""
    scales = sorted(set(CANDIDATE_SCALES) | set(settings.anchor_scales))
    ratios = sorted(set(CANDIDATE_RATIOS) | set(settings.anchor_ratios))
    table = candidate_ious(boxes, image_sizes, settings, jitter, scales, ratios)  # (N, C_r, C_s)
    start = [ratios.index(r) for r in settings.anchor_ratios], [scales.index(s) for s in settings.anchor_scales]
    ratio_indices, scale_indices = search(table, *start, settings.fg_iou)
    best = table[:, ratio_indices][:, :, scale_indices].amax(dim=(1, 2))  # (N, R, S) -> (N,)
    fitted = settings.replace(anchor_scales=sorted({scales[i] for i in scale_indices}),
                              anchor_ratios=sorted({ratios[i] for i in ratio_indices}))
    return fitted, float((best >= settings.fg_iou).double().mean())


def sample(boxes: torch.Tensor, image_sizes: torch.Tensor, count: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """At most `count` of the boxes and their image sizes, drawn without replacement, the same for a seed."""
    if len(boxes) <= count:
        return boxes, image_sizes
    chosen = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:count]
    return boxes[chosen], image_sizes[chosen]


def upscaled(settings: ModelSettings, jitter: tuple[int, int] | None, factor: float) -> tuple:
    """The settings and jitter range with images `factor` times larger (min_size, max_size, the range)."""
    larger = settings.replace(min_size=round(settings.min_size * factor), max_size=round(settings.max_size * factor))
    return larger, tuple(round(side * factor) for side in jitter) if jitter else None


def measured_fit(boxes: torch.Tensor, image_sizes: torch.Tensor, settings: ModelSettings,
                 jitter: tuple[int, int] | None, fitted: ModelSettings) -> AnchorFit:
    """An AnchorFit of `fitted` against the starting `settings`, both measured on all the boxes; the starting
    settings themselves if they cover more (a fit on a sample of the boxes may miss by a few)."""
    def covered(candidate: ModelSettings) -> float:
        coverage = anchor_coverage(boxes, image_sizes, None, candidate, jitter)
        return coverage.share(coverage.covered())

    before, after = covered(settings), covered(fitted)
    return AnchorFit(fitted, jitter, after, before) if after >= before else AnchorFit(settings, jitter, before, before)


def sample_size(settings: ModelSettings, jitter: tuple[int, int] | None = None) -> int:
    """How many boxes the fit searches on: FIT_SAMPLE (box, image size) pairs over the shorter sides measured."""
    return math.ceil(FIT_SAMPLE / len(shorter_sides(settings.min_size, jitter)))


def fit_anchors(boxes: np.ndarray | torch.Tensor, image_sizes: np.ndarray | torch.Tensor, settings: ModelSettings,
                jitter: tuple[int, int] | None = None, seed: int = 0) -> tuple[AnchorFit, AnchorFit | None]:
    """Anchors fitted to (G, 4) boxes in the pixels of their (G, 2) images (height, width): the scales and ratios
    fitted at the image size of `settings` (and `jitter`), and, if those cover fewer than TARGET_COVERAGE of the
    boxes, the smallest of UPSCALE_FACTORS larger images at which fitted ones cover as many (the one that covers
    most if none does); None if larger images are not needed."""
    boxes, image_sizes = box_tensors(boxes, image_sizes)
    if len(boxes) == 0:
        raise ValueError("no boxes to fit anchors to")
    sampled = sample(boxes, image_sizes, sample_size(settings, jitter), seed)
    fitted, _ = fit_at_size(*sampled, settings, jitter)
    here = measured_fit(boxes, image_sizes, settings, jitter, fitted)
    if here.coverage >= TARGET_COVERAGE:
        return here, None
    tried = []
    for factor in UPSCALE_FACTORS:
        larger, larger_jitter = upscaled(settings, jitter, factor)
        fitted, sampled_coverage = fit_at_size(*sampled, larger, larger_jitter)
        tried.append((sampled_coverage, fitted, larger, larger_jitter))
        if sampled_coverage >= TARGET_COVERAGE:
            break
    _, fitted, larger, larger_jitter = max(tried, key=lambda attempt: attempt[0])
    return here, measured_fit(boxes, image_sizes, larger, larger_jitter, fitted)


def anchor_flags(fit: AnchorFit, with_size: bool = False) -> str:
    """The train.py flags of a fit: its scales and ratios, and its image size if `with_size`."""
    size = f"--min_size {fit.settings.min_size} --max_size {fit.settings.max_size} " if with_size else ""
    jitter = f"--jitter {fit.jitter[0]} {fit.jitter[1]} " if with_size and fit.jitter else ""
    scales = " ".join(f"{scale:g}" for scale in fit.settings.anchor_scales)
    ratios = " ".join(f"{ratio:g}" for ratio in fit.settings.anchor_ratios)
    return f"{size}{jitter}--anchor_scales {scales} --anchor_ratios {ratios}"


def fit_report(boxes: np.ndarray | torch.Tensor, image_sizes: np.ndarray | torch.Tensor, settings: ModelSettings,
               jitter: tuple[int, int] | None = None) -> str:
    """What train.py --fit_anchors prints: the coverage before and after, the fitted flags, and whether larger
    images (a larger --min_size) would cover more."""
    here, larger = fit_anchors(boxes, image_sizes, settings, jitter)
    searched = min(len(boxes), sample_size(settings, jitter))
    fitted = ("the present ones: no other scales and ratios cover more" if here.settings == settings
              else anchor_flags(here))
    lines = [f"anchors fitted to the {len(boxes)} boxes (searched on {searched}; {len(settings.anchor_scales)} "
             f"scales x {len(settings.anchor_ratios)} ratios at most, as now) at "
             f"{describe_training_size(settings, jitter)}:",
             f"  present anchors: {here.coverage_before:.1%} of the boxes have an anchor with IoU >= "
             f"{settings.fg_iou:g}",
             f"  fitted anchors:  {here.coverage:.1%}, {fitted}"]
    if larger is None:
        lines.append(f"  a larger --min_size is not needed: the fitted anchors cover at least {TARGET_COVERAGE:.0%}")
        return "\n".join(lines)
    factor = larger.settings.min_size / settings.min_size
    reached = "reach" if larger.coverage >= TARGET_COVERAGE else "do not reach"
    lines += [f"  no scales and ratios cover {TARGET_COVERAGE:.0%} at this image size; {factor:g}x larger images "
              f"{reached} it, at the cost of {factor ** 2:.3g}x the pixels (time and memory):",
              f"  larger images:   {larger.coverage:.1%} with fitted anchors ({larger.coverage_before:.1%} with the "
              f"present ones), {anchor_flags(larger, with_size=True)}"]
    return "\n".join(lines)
