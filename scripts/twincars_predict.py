#!/usr/bin/env python
"""The original TwinCars predict loop, the reference of ``scripts/benchmark.py``'s ``cpu_predict``.

    python scripts/twincars_predict.py IMAGES_DIR model.pth classes.txt out.csv [resnet50]

Eager fp32 torchvision ResNet, one image at a time: PIL decode, Resize((224, 224)), ToTensor, Normalize.
A file of its own that imports only what the original script did (torch, torchvision, PIL), so its start-up
is the original's, not the benchmark's.
"""

import csv
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def main(images: str, model: str, classes: str, output: str, arch: str = "resnet50") -> None:
    names = Path(classes).read_text().splitlines()
    net = getattr(torchvision.models, arch)(num_classes=len(names))
    net.load_state_dict(torch.load(model, map_location="cpu", weights_only=True))
    net.eval()
    tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "name"])
        for path in sorted(Path(images).glob("*.jpg")):
            with Image.open(path) as im:
                x = tf(im.convert("RGB")).unsqueeze(0)
            with torch.no_grad():
                logits = net(x)
            writer.writerow([str(path), names[int(logits.argmax(1))]])


if __name__ == "__main__":
    main(*sys.argv[1:])
