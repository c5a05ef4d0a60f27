"""EfficientNet-Lite0/1/2 features on a Caltech-101 subset: LogisticRegression accuracy per
model and input size (a probe, not a test).

    .venv/bin/python benchmarks/lite_probe.py --root /work/shared/datasets/caltech101
        [--classes 10] [--per-class 30] [--sizes native,224]

Takes the first ``--classes`` classes (sorted, BACKGROUND_Google and Faces_easy left out) and
the first ``--per-class`` images of each, featurizes them with each model's registry
preprocessing (the featurize kernel: bicubic resize of the short side to crop/0.875, center
crop, mean = std = 0.5) at its native input size (224/240/260) and at the other ``--sizes``
(same crop fraction), and prints the test accuracy of a LogisticRegression trained on 2/3 of
each class (standardized features, C=1, the same split for every model).

``--imagenet``: instead, the ImageNet top-1 of each model's own classifier on the Caltech-101
classes that are ImageNet classes (IMAGENET below, first ``--per-class`` images of each): a
check of the weights and the input size that needs no training.

Measured on the 2-core machine (2026-12-01): ``--classes 30 --per-class 12``: LR accuracy
lite0 89.2 (224), lite1 90.0 (240) / 89.2 (224), lite2 90.8 (260) / 91.7 (224), 120 test
images (one image = 0.83 points). With PIL preprocessing, 20 images of each of the 38
IMAGENET classes: ImageNet top-1 lite0 74.6 (224); lite1 73.7 (240) / 75.0 (224); lite2
72.5 (260) / 76.2 (224).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from deeptransfer.kernels import decode_image, resize_crop_normalize
from deeptransfer.models import Preprocess, create_backbone, get_model_info

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Caltech-101 class -> its ImageNet class indices
IMAGENET = {"accordion": {401}, "airplanes": {404, 895, 908}, "barrel": {427}, "binocular": {447},
       "cannon": {471}, "cellphone": {487}, "dalmatian": {251}, "electric_guitar": {546, 402},
       "flamingo": {130}, "grand_piano": {579}, "laptop": {620, 681}, "llama": {355},
       "lobster": {122, 123}, "panda": {388}, "pizza": {963}, "platypus": {103},
       "revolver": {763}, "rooster": {7}, "saxophone": {776}, "schooner": {780},
       "scorpion": {71}, "soccer_ball": {805}, "starfish": {327}, "strawberry": {949},
       "tick": {78}, "trilobite": {69}, "umbrella": {879}, "Leopards": {288},
       "cougar_body": {286}, "dragonfly": {319}, "ant": {310}, "beaver": {337},
       "nautilus": {117}, "crayfish": {124}, "kangaroo": {104}, "elephant": {385, 386, 101},
       "hawksbill": {33, 34}, "minaret": {668}}


def load(root: str, classes: list[str], per_class: int) -> tuple[list[bytes], np.ndarray]:
    data, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c)))[:per_class]:
            with open(os.path.join(root, c, f), "rb") as fh:
                data.append(fh.read())
            labels.append(k)
    return data, np.array(labels)


def features(name: str, pre: Preprocess, data: list[bytes], batch: int = 16,
             layer: str | None = None) -> np.ndarray:
    model = create_backbone(name, layer=layer)
    out = []
    buf = np.empty((batch, pre.crop, pre.crop, 3), np.float32)
    for i in range(0, len(data), batch):
        imgs = [decode_image(b, target_short_side=pre.resize) for b in data[i:i + batch]]
        resize_crop_normalize(imgs, buf, layout="nhwc", parallel=False, **pre.kernel_args())
        x = torch.from_numpy(buf[:len(imgs)]).permute(0, 3, 1, 2)
        with torch.no_grad():
            out.append(model(x).numpy())
    return np.concatenate(out)


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/datasets/caltech101")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--sizes", default="native,224")
    ap.add_argument("--imagenet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.imagenet:
        classes = sorted(IMAGENET)
    else:
        classes = sorted(c for c in os.listdir(args.root)
                         if c not in ("BACKGROUND_Google", "Faces_easy"))[:args.classes]
    data, y = load(args.root, classes, args.per_class)
    rank = np.zeros(len(y), int)
    for k in np.unique(y):
        rank[y == k] = np.arange((y == k).sum())
    train = rank % 3 != 2
    split = "" if args.imagenet else f", {train.sum()} train / {(~train).sum()} test"
    print(f"{len(y)} images, {len(classes)} classes{split}")
    for name in MODELS:
        native = get_model_info(name).preprocess
        for size in args.sizes.split(","):
            crop = native.crop if size == "native" else int(size)
            if size != "native" and crop == native.crop:
                continue
            pre = Preprocess(resize=round(crop / 0.875), crop=crop, mean=native.mean,
                             std=native.std)
            t = time.perf_counter()
            if args.imagenet:
                top1 = features(name, pre, data, layer="logits").argmax(1)
                acc = np.mean([p in IMAGENET[classes[k]] for p, k in zip(top1, y)])
                print(f"{name}  input {crop} (resize {pre.resize})  ImageNet top-1 "
                      f"{100 * acc:5.1f}%  ({time.perf_counter() - t:.0f} s)", flush=True)
                continue
            x = features(name, pre, data)
            sc = StandardScaler().fit(x[train])
            clf = LogisticRegression(C=1.0, max_iter=3000).fit(sc.transform(x[train]), y[train])
            acc = (clf.predict(sc.transform(x[~train])) == y[~train]).mean()
            print(f"{name}  input {crop} (resize {pre.resize})  LR test accuracy "
                  f"{100 * acc:5.1f}%  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
