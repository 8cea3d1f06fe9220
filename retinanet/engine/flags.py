"""What the scripts share on the command line: the flags of running a trained model (the paper's §4.1 "Inference"
at the image size the model was trained at) and how a script ends on a user error: one message, no traceback."""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .runtime import error_message


def add_inference_arguments(parser: argparse.ArgumentParser, model_required: bool = True, workers: int = 0) -> None:
    """The flags of every script that runs a trained model: the checkpoint, image size, batching and device;
    `workers` is the default of --workers."""
    parser.add_argument("--model", required=model_required, metavar="CHECKPOINT", help="checkpoint written by train.py, or a bare state dict")
    parser.add_argument("--batch_size", type=int, default=8, help="images per inference batch (default 8)")
    parser.add_argument("--min_size", type=int, help="shorter image side after resizing (default: as in training; 608 for a bare state dict, as yhenon's)")
    parser.add_argument("--max_size", type=int, help="longest image side after resizing (default: as in training; 1024 for a bare state dict, as yhenon's)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=workers, help=f"image loading processes (default {workers}; 0: load in this process)")


def add_anchor_arguments(parser: argparse.ArgumentParser) -> None:
    """The anchors' flags (§4 "Anchors"), model settings of the same names (settings.py)."""
    parser.add_argument("--anchor_sizes", type=float, nargs=5, metavar="SIZE", help="anchor size on P3..P7 (paper: 32 64 128 256 512)")
    parser.add_argument("--anchor_scales", type=float, nargs="+", metavar="SCALE", help="anchor scales per level (paper: 1 1.26 1.587, 2^0, 2^(1/3), 2^(2/3))")
    parser.add_argument("--anchor_ratios", type=float, nargs="+", metavar="H/W", help="anchor aspect ratios, height / width (paper: 0.5 1 2)")


def typed_settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The model settings among `names` that flags of the same names set (those not None), lists as tuples."""
    typed = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {name: tuple(value) if isinstance(value, list) else value for name, value in typed.items()}


def inference_options(args: argparse.Namespace) -> dict:
    """The values of add_inference_arguments' flags but --model, as keyword arguments of predict_with_checkpoint."""
    return {name: getattr(args, name) for name in ("device", "min_size", "max_size", "batch_size", "workers")}


def require_dataset_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          needed: dict[str, tuple[str, ...]]) -> None:
    """End with argparse's usage message unless the flags that args.dataset needs (`needed[dataset]`) are given."""
    flags = needed.get(args.dataset, ())
    if not all(getattr(args, flag) for flag in flags):
        parser.error(f"--dataset {args.dataset} needs " + " and ".join(f"--{flag}" for flag in flags))


def run_script(
    run: Callable[[Any], int | None],
    args: Any,
    prog: str | None,
    errors: tuple[type[Exception], ...] = (ValueError,),
) -> int:
    """The exit status of `run(args)`: its own, or 0 if it returns None. An error of the types in `errors` (bad
    files or arguments, whose message says which) becomes one line on stderr, "{prog}: error: {message}" ("error:
    {message}" without a prog), and exit status 2."""
    try:
        return run(args) or 0
    except errors as error:
        prefix = f"{prog}: " if prog else ""
        print(f"{prefix}error: {error_message(error)}", file=sys.stderr)
        return 2
