"""What the scripts share on the command line, as plain values: the flags of running a trained model, those of the
anchors, of large images and of CSV data, what is wrong with an annotation source, and how a script ends on a user error
(one message, no traceback). The scripts add the flags to their own parsers:
`for name, options in ANCHOR_FLAGS: parser.add_argument(name, **options)`."""

import sys
from collections.abc import Callable
from typing import Any

from ..data.tiles import DEFAULT_OVERLAP
from .runtime import error_message


def inference_flags(model_required: bool = True, workers: int = 0,
                    detection_threshold: bool = True) -> list[tuple[str, dict]]:
    """The flags of every script that runs a trained model: the checkpoint, image size, the limits of §4.1
    "Inference", batching and device, as (name, keyword arguments of add_argument); `workers` is the default of
    --workers; without `detection_threshold`, no --detection_threshold (predict.py calls it --score_threshold)."""
    threshold = ("--detection_threshold", dict(type=float, help="the model's score threshold, below which detections are dropped (default: the model's, 0.05 as in the paper)"))
    return ([threshold] if detection_threshold else []) + [
        ("--model", dict(required=model_required, metavar="CHECKPOINT", help="checkpoint written by train.py, or a bare state dict")),
        ("--batch_size", dict(type=int, default=8, help="images per inference batch (default 8)")),
        ("--min_size", dict(type=int, help="shorter image side after resizing (default: as in training; 608 for a bare state dict, as yhenon's)")),
        ("--max_size", dict(type=int, help="longest image side after resizing (default: as in training; 1024 for a bare state dict, as yhenon's)")),
        ("--max_detections", dict(type=int, help="at most this many detections an image, the best (default: the model's, 100 as COCO scores)")),
        ("--nms_threshold", dict(type=float, help="IoU at which NMS removes the lower-scored of two boxes of a class (default: the model's, 0.5 as in the paper)")),
        ("--topk_candidates", dict(type=int, help="candidates kept per pyramid level before NMS (default: the model's, 1000 as in the paper)")),
        ("--device", dict(help="cpu, cuda or cuda:N (default: cuda when available)")),
        ("--workers", dict(type=int, default=workers, help=f"image loading processes (default {workers}; 0: load in this process)")),
    ]


# The anchors (§4 "Anchors"), model settings of the same names (settings.py)
ANCHOR_FLAGS = (
    ("--anchor_sizes", dict(type=float, nargs=5, metavar="SIZE", help="anchor size on P3..P7 (paper: 32 64 128 256 512)")),
    ("--anchor_scales", dict(type=float, nargs="+", metavar="SCALE", help="anchor scales per level (paper: 1 1.26 1.587, 2^0, 2^(1/3), 2^(2/3))")),
    ("--anchor_ratios", dict(type=float, nargs="+", metavar="H/W", help="anchor aspect ratios, height / width (paper: 0.5 1 2)")),
)


# Large images: tiled prediction (tiling.py) and Pillow's pixel limit (data/images.py)
TILE_FLAGS = (
    ("--tile", dict(type=int, metavar="SIZE", help="cut images larger than SIZE x SIZE pixels into overlapping tiles of that size, each resized by min_size / SIZE, and merge their detections; --batch_size then counts tiles")),
    ("--tile_overlap", dict(type=float, metavar="FRACTION", help=f"with --tile: how much neighbouring tiles overlap at least, a fraction of a tile (default {DEFAULT_OVERLAP})")),
)
LARGE_IMAGE_FLAGS = (
    ("--allow_large_images", dict(action="store_true", help="read images past Pillow's limit of about 89 million pixels (a 20,000 x 20,000 orthophoto); only for files you trust")),
)


# Forgiving CSV data: boxes without area left out (data/annotations.py) instead of stopping at the first one
CSV_FLAGS = (
    ("--drop_degenerate_boxes", dict(action="store_true", help="leave out CSV boxes without area (x2 <= x1 or y2 <= y1), counted and named in a warning, instead of stopping")),
)


# The model settings that inference_flags change (settings.py): the image size and §4.1 "Inference"'s limits
INFERENCE_SETTINGS = ("min_size", "max_size", "max_detections", "nms_threshold", "topk_candidates")


def inference_settings(flags: dict) -> dict:
    """The model settings among a script's flags (its parsed flags as a dict) that were given (a flag the script
    lacks counts as not given); --detection_threshold is the setting score_threshold."""
    return given(**{name: flags.get(name) for name in INFERENCE_SETTINGS},
                 score_threshold=flags.get("detection_threshold"))


def annotation_source_problem(csv_annotations: str | None, csv_classes: str | None,
                              voc_path: list[str] | None) -> str | None:
    """What is wrong with the flags that name one annotated set (--csv_annotations with --csv_classes, or
    --voc_path), for the script's parser.error; None if nothing is."""
    if (csv_annotations is None) == (voc_path is None):
        return "give either --csv_annotations CSV (with --csv_classes CSV) or --voc_path ROOT"
    if csv_annotations and not csv_classes:
        return "--csv_annotations needs --csv_classes"
    return None


def given(**values) -> dict:
    """The values that are given (not None): a flag's None means "not typed", so the model's setting stays."""
    return {name: value for name, value in values.items() if value is not None}


def run_script(run: Callable[[Any], int | None], parsed: Any, prog: str | None,
               errors: tuple[type[Exception], ...] = (ValueError,)) -> int:
    """The exit status of `run(parsed)`: its own, or 0 if it returns None. An error of the types in `errors` (bad
    files or arguments, whose message says which) becomes one line on stderr, "{prog}: error: {message}" ("error:
    {message}" without a prog), and exit status 2."""
    try:
        return run(parsed) or 0
    except errors as error:
        prefix = f"{prog}: " if prog else ""
        print(f"{prefix}error: {error_message(error)}", file=sys.stderr)
        return 2
