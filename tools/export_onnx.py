"""Export a trained RetinaNet's network (backbone, FPN, subnets) to ONNX, with dynamic batch and image size.

    pip install onnx onnxruntime onnxscript
    python tools/export_onnx.py output/best.pt retinanet.onnx

The graph maps "images" (B, 3, H, W), float32 RGB in 0..1, to "cls_logits" (B, R, K) and "box_deltas" (B, R, 4);
it normalises the images itself (ImageNet mean and std, as the model's network_outputs does). Anchors, decoding
and NMS run outside it: the model's detect(cls_logits, box_deltas, padded_size).
"""

import argparse
import os
import sys

# Run as a script (python tools/export_onnx.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.engine.export import export_onnx  # noqa: E402
from retinanet.engine.flags import run_script  # noqa: E402
from retinanet.engine.models import load_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="written by train.py or tools/convert_torchvision.py, or a state dict")
    parser.add_argument("output", help="ONNX file to write")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Load the checkpoint, export its network, and say where the file went."""
    model, class_names = load_model(args.checkpoint)
    print(f"exporting the ResNet-{model.depth} RetinaNet of {args.checkpoint} ({len(class_names)} classes) to ONNX; "
          f"this traces the model and takes up to a minute")
    export_onnx(model, args.output, class_names)
    print(f"ONNX model written to {args.output}: input 'images' (B, 3, H, W), outputs 'cls_logits' (B, R, K) and "
          f"'box_deltas' (B, R, 4); decode them with the model's detect(cls_logits, box_deltas, padded_size)")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "export_onnx.py")


if __name__ == "__main__":
    sys.exit(main())
