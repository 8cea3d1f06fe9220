"""Detect objects with a trained RetinaNet in image files, folders (searched recursively) and the images of CSV
annotation files, and write the detections, in each image's own pixels, to a CSV or a COCO-style JSON file.

    python predict.py --model output/best.pt photos/ extra.jpg val.csv --output detections.csv
    python predict.py --model output/best.pt photos/ --output detections.csv --draw drawn/
    python predict.py --model output/best.pt aerial/ --output detections.json --tile_size 800

CSV rows are `path,x1,y1,x2,y2,class_name,score`, one `path,,,,,,` for an image without detections; JSON holds
{"file_name", "bbox": [x, y, width, height], "category_name", "score"} entries. With --tile_size SIZE, images larger
than SIZE x SIZE pixels are cut into overlapping tiles seen at the model's scale, and the tiles' detections merged
(retinanet/extras/tiling.py, docs/large-images.md).

Exit status: 0 when every image was read; 1 when some could not be (each is named at the end, and the output holds
the others); 2 on a user error (a bad flag, checkpoint or CSV file), with one message.
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from retinanet.checkpoint import load_model
from retinanet.dataloader import ImageFiles, find_images, inference_loader, read_csv_image_paths, write_atomically
from retinanet.extras.drawing import DRAW_THRESHOLD
from retinanet.inference import cap_report, predict
from retinanet.settings import (INFERENCE_SETTINGS, add_inference_flags, default_workers, resolve_device, run_script,
                                typed_settings)

OUTPUT_FORMATS = (".csv", ".json")
BOX_DECIMALS, SCORE_DECIMALS = 2, 4  # hundredths of a pixel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images (searched recursively) and CSV files of annotations path,x1,y1,x2,y2,class_name (their images)")
    parser.add_argument("--output", required=True, metavar="FILE", help="where the detections go: a .csv or a .json file")
    parser.add_argument("--draw", metavar="DIR", help="also save each image with its detections drawn on it into DIR")
    parser.add_argument("--draw_threshold", type=float, help=f"with --draw: draw the detections with at least this score (default {DRAW_THRESHOLD})")
    parser.add_argument("--tile_size", type=int, metavar="SIZE", help="cut images larger than SIZE x SIZE pixels into overlapping tiles of that size, each resized by min_size / SIZE, and merge their detections; --batch_size then counts tiles")
    parser.add_argument("--tile_overlap", type=float, metavar="FRACTION", help="with --tile_size: how much neighbouring tiles overlap at least, a fraction of a tile (default 0.25)")
    parser.add_argument("--allow_large_images", action="store_true", help="read images past Pillow's limit of about 89 million pixels; only for files you trust")
    add_inference_flags(parser, workers=default_workers())
    args = parser.parse_args(argv)
    for flag, needed in (("tile_overlap", "tile_size"), ("draw_threshold", "draw")):
        if getattr(args, flag) is not None and getattr(args, needed) is None:
            parser.error(f"--{flag} needs --{needed}")
    for flag in ("score_threshold", "draw_threshold"):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= 1:
            parser.error(f"--{flag} must be a score in [0, 1], got {getattr(args, flag)}")
    return args


def collect_images(inputs: list[str]) -> list[str]:
    """The image paths `inputs` name, each once, in order: a CSV file (.csv) gives the images of its rows, a folder
    the images in it and its subfolders, any other path is an image (a missing one is found missing when read)."""
    image_paths: dict[str, str] = {}  # absolute path -> the path as found
    for path in inputs:
        if path.lower().endswith(".csv"):
            found = read_csv_image_paths(path)
        else:
            found = find_images(path, recursive=True) if os.path.isdir(path) else [path]
        for image_path in found:
            image_paths.setdefault(os.path.abspath(image_path), image_path)
    return list(image_paths.values())


def detect_whole(model, image_paths: list[str], args: argparse.Namespace) -> tuple[list, dict[str, str]]:
    """Each image's detections, seen whole (None for an image that could not be read), and why each such image
    could not be."""
    images = ImageFiles(image_paths, model.settings.min_size, model.settings.max_size, args.allow_large_images)
    loader = inference_loader(images, args.batch_size, args.workers, pin_memory=next(model.parameters()).is_cuda)
    progress = tqdm(predict(model, loader), total=len(images), desc="detecting", unit="image")
    found = {images.image_paths[index]: prediction for index, prediction in progress}
    predictions = [found.get(path) for path in image_paths]
    skipped = {path: images.why_unread(path) for path, prediction in zip(image_paths, predictions) if prediction is None}
    print(cap_report([prediction for prediction in predictions if prediction], model.settings.max_detections))
    return predictions, skipped


def detect_tiled(model, image_paths: list[str], args: argparse.Namespace) -> tuple[list, dict[str, str]]:
    """detect_whole's result, with images larger than a tile cut into tiles (extras/tiling.py)."""
    from retinanet.extras.tiling import DEFAULT_OVERLAP, ImageWindows, describe_windows, predict_windows

    overlap = DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap
    windows = ImageWindows(image_paths, model.settings.min_size, model.settings.max_size, args.tile_size, overlap,
                           args.allow_large_images)
    print(f"images {describe_windows(windows, args.tile_size)}")
    predictions = predict_windows(model, windows, args.batch_size, args.workers)
    return predictions, {path: windows.unread_reason(number) for number, (path, prediction)
                         in enumerate(zip(image_paths, predictions)) if prediction is None}


def detection_rows(image_path: str, prediction: dict[str, np.ndarray], class_names: list[str]) -> list[tuple]:
    """(path, x1, y1, x2, y2, class_name, score) of each detection of an image, boxes and scores rounded."""
    boxes = np.round(prediction["boxes"].astype(np.float64), BOX_DECIMALS).tolist()
    scores = np.round(prediction["scores"].astype(np.float64), SCORE_DECIMALS).tolist()
    return [(image_path, *box, class_names[int(label)], score)
            for box, label, score in zip(boxes, prediction["labels"], scores)]


def write_detections(path: str, found: dict[str, dict], class_names: list[str]) -> int:
    """Write the detections of the images read, {path: prediction}, to `path` atomically: CSV rows by image and
    decreasing score (`path,,,,,,` for an image without any), or COCO-style JSON entries. Returns their number."""
    rows = {image_path: detection_rows(image_path, prediction, class_names) for image_path, prediction in found.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".json"):
        results = [{"file_name": image, "bbox": [x1, y1, round(x2 - x1, BOX_DECIMALS), round(y2 - y1, BOX_DECIMALS)],
                    "category_name": name, "score": score}
                   for image_rows in rows.values() for image, x1, y1, x2, y2, name, score in image_rows]
        write_atomically(path, lambda file: json.dump(results, file))
    else:
        lines = [row for image, image_rows in rows.items() for row in image_rows or [(image, "", "", "", "", "", "")]]
        write_atomically(path, lambda file: csv.writer(file, lineterminator="\n").writerows(lines))
    return sum(len(image_rows) for image_rows in rows.values())


def run(args: argparse.Namespace) -> int:
    """Predict, write the detections (and drawings), and name the images that could not be read."""
    if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:  # before the model is read
        raise ValueError(f"{args.output}: the output file must end in .csv (rows path,x1,y1,x2,y2,class_name,score) "
                         f"or .json (COCO-style results)")
    image_paths = collect_images(args.inputs)
    device = resolve_device(args.device)
    model, class_names = load_model(args.model, device, **typed_settings(vars(args), INFERENCE_SETTINGS))
    print(f"detecting on {len(image_paths)} images with {args.model}, score >= {model.settings.score_threshold:g}, "
          f"on {device}")
    predictions, skipped = (detect_tiled if args.tile_size else detect_whole)(model, image_paths, args)
    found = {path: prediction for path, prediction in zip(image_paths, predictions) if prediction is not None}
    count = write_detections(args.output, found, class_names)
    print(f"wrote {count} detections in {len(found)} images to {os.path.abspath(args.output)}")
    if args.draw:
        from retinanet.extras.drawing import draw_predictions

        threshold = DRAW_THRESHOLD if args.draw_threshold is None else args.draw_threshold
        drawn = draw_predictions(list(found), list(found.values()), class_names, args.draw, threshold)
        print(f"drew the detections with score >= {threshold:g} on {len(drawn)} images in {os.path.abspath(args.draw)}")
    if skipped:
        reasons = "\n  ".join(skipped.values())
        print(f"skipped {len(skipped)} image(s) that could not be read:\n  {reasons}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "predict.py")


if __name__ == "__main__":
    sys.exit(main())
