"""The ``freezeray`` command."""

from __future__ import annotations

import argparse
import sys


def _summary(args: argparse.Namespace) -> int:
    import surgery

    model = surgery.load(args.model) if "/" in args.model or args.model.startswith(".") else surgery.zoo.load(args.model)
    print(surgery.summary(model))
    return 0


def _demo(args: argparse.Namespace) -> int:
    # the smallest real thing until the featurize/fit demo lands: classify the two sample photos
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_image

    import surgery
    from surgery.preprocess import normalize, resize_crop

    model = surgery.zoo.load("efficientnet_lite0", weights="imagenet")
    info = surgery.get_info(model)
    for photo in ("china.jpg", "flower.jpg"):
        x = normalize(torch.from_numpy(resize_crop(Image.fromarray(load_sample_image(photo)), info.preprocessing))[None], info.preprocessing)
        with torch.no_grad():
            p = model(x).softmax(1)[0]
        print(f"{photo}: {info.classes[int(p.argmax())]} ({float(p.max()):.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="freezeray", description="Transfer learning at dataset scale on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print the vertices of a zoo model or a saved model")
    p.add_argument("model", help="a zoo name (e.g. vgg16) or a saved model folder/URI")
    p.set_defaults(fn=_summary)
    p = sub.add_parser("demo", help="run the demo job")
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
