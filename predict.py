"""Detect objects with a trained RetinaNet in image files, folders (searched recursively) and the images of CSV
annotation files, and write the detections, in each image's own pixels, to a CSV or a COCO-style JSON file.

    python predict.py --model output/best.pt photos/ extra.jpg val.csv --output detections.csv
    python predict.py --model output/best.pt aerial/ --output detections.json --tile 800 --tile_overlap 0.25
    python predict.py --model output/best.pt photos/ --output detections.csv --draw drawn/

CSV rows are `path,x1,y1,x2,y2,class_name,score`, one `path,,,,,,` for an image without detections; JSON holds
{"file_name", "bbox": [x, y, width, height], "category_name", "score"} entries. With --tile SIZE, images larger
than SIZE x SIZE pixels are cut into overlapping tiles, each resized by min_size / SIZE (a tile of the model's
min_size is seen at scale 1), and the tiles' detections merged (retinanet/engine/tiling.py).

Exit status: 0 when every image was read; 1 when some could not be (each is named at the end, and the output holds
the others); 2 on a user error (a bad flag, checkpoint or CSV file), with one message.
"""

import argparse
import os
import sys

from retinanet.data.tiles import DEFAULT_OVERLAP
from retinanet.engine.batch_inference import say_if_capped
from retinanet.engine.detection_files import collect_images, output_format, predict_images, write_detections
from retinanet.engine.drawing import DRAW_THRESHOLD, draw_predictions
from retinanet.engine.flags import LARGE_IMAGE_FLAGS, TILE_FLAGS, given, inference_flags, inference_settings, run_script
from retinanet.engine.models import load_model
from retinanet.engine.runtime import default_workers, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images (searched recursively) and CSV files of annotations path,x1,y1,x2,y2,class_name (their images)")
    parser.add_argument("--output", required=True, metavar="FILE", help="where the detections go: a .csv or a .json file")
    parser.add_argument("--score_threshold", type=float, help="keep detections with at least this score (default: the model's, 0.05 as in the paper)")
    parser.add_argument("--draw", metavar="DIR", help="also save each image with its detections drawn on it into DIR")
    parser.add_argument("--draw_threshold", type=float, help=f"with --draw: draw the detections with at least this score (default {DRAW_THRESHOLD})")
    for name, options in [*TILE_FLAGS, *LARGE_IMAGE_FLAGS,
                          *inference_flags(workers=default_workers(), detection_threshold=False)]:
        parser.add_argument(name, **options)
    args = parser.parse_args(argv)
    for flag, needed in (("tile_overlap", "tile"), ("draw_threshold", "draw")):
        if getattr(args, flag) is not None and getattr(args, needed) is None:
            parser.error(f"--{flag} needs --{needed}")
    for flag in ("score_threshold", "draw_threshold"):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= 1:
            parser.error(f"--{flag} must be a score in [0, 1], got {getattr(args, flag)}")
    return args


def run(args: argparse.Namespace) -> int:
    """Predict, write the detections (and drawings), and name the images that could not be read."""
    output_format(args.output)  # a wrong extension stops the run before the model is loaded
    image_paths = collect_images(args.inputs)
    changes = inference_settings(vars(args)) | given(score_threshold=args.score_threshold)
    model, class_names = load_model(args.model, resolve_device(args.device), **changes)
    found = predict_images(model, class_names, image_paths, args.batch_size, args.workers, args.tile,
                           DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap, args.allow_large_images)
    count = write_detections(args.output, found)
    print(f"wrote {count} detections in {len(found.image_paths)} images to {os.path.abspath(args.output)}")
    if not args.tile:  # tiled, the cap is each tile's
        say_if_capped(found.predictions, model.settings.max_detections)
    if args.draw:
        threshold = DRAW_THRESHOLD if args.draw_threshold is None else args.draw_threshold
        drawn = draw_predictions(found.image_paths, found.predictions, found.class_names, args.draw, threshold)
        print(f"drew the detections with score >= {threshold:g} on {len(drawn)} images in {os.path.abspath(args.draw)}")
    if found.skipped:
        reasons = "\n  ".join(found.skipped.values())
        print(f"skipped {len(found.skipped)} image(s) that could not be read:\n  {reasons}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "predict.py")


if __name__ == "__main__":
    sys.exit(main())
