"""Export a trained RetinaNet's network (backbone, FPN, subnets) to ONNX, with dynamic batch and image size.

    pip install onnx onnxruntime onnxscript
    python tools/export_onnx.py output/best.pt retinanet.onnx

The graph maps "images" (B, 3, H, W), normalised as in training, to "cls_logits" (B, R, K) and "box_deltas"
(B, R, 4). Anchors, decoding and NMS run outside it: retinanet.export.detect_from_outputs.
"""

import argparse
import os
import sys

# Run as a script (python tools/export_onnx.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.export import export_onnx  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="written by train.py or tools/convert_torchvision.py, or a state dict")
    parser.add_argument("output", help="ONNX file to write")
    args = parser.parse_args(argv)

    try:
        model, class_names = load_model(args.checkpoint)
    except ValueError as error:  # missing, unreadable or unsafe file; the message says which
        print(f"export_onnx.py: error: {error}", file=sys.stderr)
        return 2
    print(f"exporting the ResNet-{model.depth} RetinaNet of {args.checkpoint} ({len(class_names)} classes) to ONNX; "
          f"this traces the model and takes up to a minute")
    export_onnx(model, args.output, class_names)
    print(f"ONNX model written to {args.output}: input 'images' (B, 3, H, W), outputs 'cls_logits' (B, R, K) and "
          f"'box_deltas' (B, R, 4); decode them with the model's detect(cls_logits, box_deltas, padded_size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
