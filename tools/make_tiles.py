"""Cut large annotated images (CSV or Pascal VOC) into overlapping training tiles, with their boxes, written as PNG
files and a CSV in the training format.

    python tools/make_tiles.py --csv_train large.csv --classes classes.csv --tile_size 800 --output_dir tiles/
    python tools/make_tiles.py --voc_path orthophotos/ --tile_size 800 --output_dir tiles/ --allow_large_images
    python train.py --dataset csv --csv_train tiles/train.csv --classes tiles/classes.csv --min_size 800 --max_size 800

Tiles of --tile_size pixels overlap by at least --tile_overlap of a tile, the first and last flush with the image's
edges; an image smaller than a tile gives one tile of its own size. A box cut by a tile's edge is kept, clipped, when
at least --min_visible of its area lies inside the tile, and left out of that tile otherwise (retinanet/data/tiles.py).
Train with --min_size and --max_size equal to the tile size to see the tiles at scale 1, and predict or evaluate on
the large images with --tile_size of the same size (predict.py, csv_eval.py): the windows are the same.
"""

import argparse
import os
import sys

# Run as a script (python tools/make_tiles.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.data.tiles import DEFAULT_MIN_VISIBLE, DEFAULT_OVERLAP, TilingReport, cut_into_tiles  # noqa: E402
from retinanet.data.voc import VOCDataset  # noqa: E402
from retinanet.dataloader import CSVDataset, read_class_list  # noqa: E402
from retinanet.settings import run_script  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv_train", metavar="CSV", help="CSV annotations of the large images: path,x1,y1,x2,y2,class_name")
    parser.add_argument("--classes", metavar="CSV", help="class list, rows class_name,id (with --voc_path: default, the classes found)")
    parser.add_argument("--drop_degenerate_boxes", action="store_true", help="leave out CSV boxes without area (x2 <= x1 or y2 <= y1), counted and named, instead of stopping")
    parser.add_argument("--voc_path", nargs="+", metavar="ROOT", help="Pascal VOC instead: VOC roots or folders of XML files next to their images")
    parser.add_argument("--train_set", default="trainval", help="with --voc_path: the set of a VOC root (default trainval)")
    parser.add_argument("--output_dir", required=True, metavar="DIR", help="where the tiles (DIR/images/), DIR/train.csv and DIR/classes.csv go")
    parser.add_argument("--tile_size", type=int, required=True, metavar="SIZE", help="tiles of SIZE x SIZE pixels of the images at their own resolution")
    parser.add_argument("--tile_overlap", type=float, default=DEFAULT_OVERLAP, metavar="FRACTION", help=f"how much neighbouring tiles overlap at least, a fraction of a tile (default {DEFAULT_OVERLAP}); objects up to that size lie whole in some tile")
    parser.add_argument("--min_visible", type=float, default=DEFAULT_MIN_VISIBLE, metavar="FRACTION", help=f"a box cut by a tile's edge is kept, clipped, when at least this fraction of its area is inside the tile (default {DEFAULT_MIN_VISIBLE})")
    parser.add_argument("--skip_empty", action="store_true", help="write no tile without a box (default: such tiles are written as images without objects, path,,,,,)")
    parser.add_argument("--allow_large_images", action="store_true", help="read images past Pillow's limit of about 89 million pixels; only for files you trust")
    args = parser.parse_args(argv)
    if (args.csv_train is None) == (args.voc_path is None):
        parser.error("give either --csv_train CSV (with --classes CSV) or --voc_path ROOT")
    if args.csv_train and not args.classes:
        parser.error("--csv_train needs --classes")
    return args


def describe(report: TilingReport, args: argparse.Namespace) -> str:
    """What was written and decided, in words."""
    empty = (f"{report.empty_tiles} tiles without a box left out" if args.skip_empty
             else f"{report.empty_tiles} of them without a box")
    return (f"cut {report.images} images into {report.tiles} tiles of {args.tile_size} x {args.tile_size} pixels "
            f"(overlap >= {args.tile_overlap:g}) in {os.path.abspath(args.output_dir)}, {empty}; in the tiles, "
            f"{report.whole} boxes whole, {report.clipped} cut by a tile's edge and kept clipped (>= "
            f"{args.min_visible:g} of their area inside), {report.left_out} cut and left out (less inside)")


def run(args: argparse.Namespace) -> None:
    """Read the annotations, cut every image into tiles, and say what was written and how to train on it."""
    if args.csv_train:
        dataset = CSVDataset(args.csv_train, args.classes, drop_degenerate=args.drop_degenerate_boxes,
                             allow_large=args.allow_large_images)
    else:
        class_names = read_class_list(args.classes) if args.classes else None
        # difficult boxes: boxes like any other
        dataset = VOCDataset(args.voc_path, args.train_set, class_names, allow_large=args.allow_large_images)
    images = [(dataset.image_paths[index], dataset.load_annotations(index)) for index in range(len(dataset))]
    report = cut_into_tiles(images, dataset.class_names, args.output_dir, args.tile_size, args.tile_overlap,
                            args.min_visible, args.skip_empty, args.allow_large_images)
    print(describe(report, args))
    output = args.output_dir
    print(f"train on them: python train.py --dataset csv --csv_train {os.path.join(output, 'train.csv')} "
          f"--classes {os.path.join(output, 'classes.csv')} --min_size {args.tile_size} --max_size "
          f"{args.tile_size}; predict on large images with predict.py --tile_size {args.tile_size}")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "make_tiles.py")


if __name__ == "__main__":
    sys.exit(main())
