"""Export a trained RetinaNet to ONNX, with dynamic batch and image size: its network (backbone, FPN, subnets), or
with --detections the whole detector, anchors, decoding and NMS included.

    pip install onnx onnxruntime onnxscript
    python tools/export_onnx.py output/best.pt retinanet.onnx
    python tools/export_onnx.py output/best.pt detector.onnx --detections --max_detections 300

Both graphs take "images" (B, 3, H, W), float32 RGB in 0..1, resized as the model was trained (see README), and
normalise them themselves. The network's outputs are "cls_logits" (B, R, K) and "box_deltas" (B, R, 4), for the
model's detect(cls_logits, box_deltas, padded_size). The detector's are "boxes" (B, M, 4) x1y1x2y2 in input pixels,
"scores" (B, M), "labels" (B, M) and "num_detections" (B,): image b's detections are its first num_detections[b]
rows, by decreasing score (retinanet/extras/export.py). The model's class names and settings are in the file's
metadata.
"""

import argparse
import os
import sys

# Run as a script (python tools/export_onnx.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.extras.export import export_onnx  # noqa: E402
from retinanet.settings import add_setting_flags, run_script, typed_settings  # noqa: E402

# The settings of §4.1 "Inference" that an exported detector holds, as the scripts that run a model take them
DETECTION_SETTINGS = ("score_threshold", "topk_candidates", "nms_threshold", "max_detections")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="written by train.py or tools/convert_torchvision.py, or a state dict")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--detections", action="store_true", help="export the whole detector: images to boxes, scores, labels and num_detections, decoding and NMS inside the graph")
    add_setting_flags(parser.add_argument_group("with --detections: the model's settings, changed for the export"),
                      DETECTION_SETTINGS)
    args = parser.parse_args(argv)
    typed = [f"--{name}" for name in typed_settings(vars(args), DETECTION_SETTINGS)]
    if typed and not args.detections:
        parser.error(f"{', '.join(typed)} only change an export with --detections (the network alone holds no NMS)")
    return args


def run(args: argparse.Namespace) -> None:
    """Load the checkpoint, export its network or its whole detector, and say where the file went."""
    model, class_names = load_model(args.checkpoint, **typed_settings(vars(args), DETECTION_SETTINGS))
    what = "detector (network, decoding and NMS)" if args.detections else "network"
    print(f"exporting the ResNet-{model.depth} RetinaNet {what} of {args.checkpoint} ({len(class_names)} classes) to "
          f"ONNX; this traces the model and takes up to a minute")
    export_onnx(model, args.output, class_names, detections=args.detections)
    if args.detections:
        settings = model.settings
        print(f"ONNX detector written to {args.output}: input 'images' (B, 3, H, W), outputs 'boxes' (B, M, 4), "
              f"'scores' (B, M), 'labels' (B, M) and 'num_detections' (B,); M = {settings.max_detections}, score "
              f"threshold {settings.score_threshold:g}, NMS at IoU {settings.nms_threshold:g}")
    else:
        print(f"ONNX model written to {args.output}: input 'images' (B, 3, H, W), outputs 'cls_logits' (B, R, K) and "
              f"'box_deltas' (B, R, 4); decode them with the model's detect(cls_logits, box_deltas, padded_size), or "
              f"export with --detections")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "export_onnx.py")


if __name__ == "__main__":
    sys.exit(main())
