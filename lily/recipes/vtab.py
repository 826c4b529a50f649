"""VTAB-1k on a ViT: k/v adapters plus a parallel MLP adapter, the FacT/NOAH protocol.

The paper's settings (`visual-adaptation-benchmark/vit/main.py` of the official code): ViT-B/16
(ImageNet-21k), Lily on attention key and value with dim (r) 32 and ne = 4 (A groups and B experts),
plus a parallel adapter on every MLP block (ReLU, hidden 2r); AdamW lr 1e-3, weight decay 1e-4, batch 64,
100 epochs, cosine schedule with 10 warm-up epochs down to 1e-5; images at 224 px; train on the 1,000
images of `train800val200.txt`, test every 10 epochs on `test.txt` and report the best test accuracy.

Differences, stated: images use the model's own normalisation (the paper's code uses none), there is no
drop-path, and the warm-up starts from 0 rather than 1e-6.

    lily recipe vtab --model google/vit-base-patch16-224-in21k --data vtab-1k/cifar --output-dir out/cifar
    python -m lily.recipes.vtab export-fashion DIR    # Fashion-MNIST as a VTAB-1k list folder (an analogue)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

TASKS = (
    "cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",  # natural
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",  # specialized
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
)  # fmt: skip
"""The 19 VTAB-1k tasks, under the folder names of the common release (NOAH / RepAdapter)."""

DEFAULTS: dict[str, Any] = {
    "task": "image-cls",
    "method": "lily",
    "targets": ["k_proj|key", "v_proj|value"],
    "parallel_modules": ["mlp|intermediate>output.dense"],
    "r": 32,
    "num_A": 4,
    "num_B": 4,
    "scaling": 1.0,
    "routing": "sample",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "epochs": 100,
    "schedule": "cosine",
    "warmup_ratio": 0.1,
    "min_lr": 1e-5,
    "image_size": 224,
    "eval_epochs": 10,
    "select_on_test": True,
    "max_train_samples": None,
    "max_eval_samples": None,
    "max_test_samples": None,
}
"""`lily train` options of the recipe. Routing is "sample" (per image); the paper's code pools the router
over the whole batch ("batch"), which makes an image's output depend on its batch-mates."""

RECIPES = {"vtab": DEFAULTS}


def export_fashion(directory: str | Path, train: int = 1000, test: int = 2000, seed: int = 0) -> Path:
    """Write Fashion-MNIST (the bundled copy) as a VTAB-1k task folder: PNGs plus the four list files.

    `train` images from the training set (the first 800 of them in train800.txt, the rest in val200.txt)
    and `test` from the test set, each drawn at random with `seed`.
    """
    from PIL import Image

    from lily import assets

    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    arrays = assets.fashion_mnist()
    lists: dict[str, list[str]] = {}
    for split, count in (("train", train), ("test", test)):
        images, labels = arrays[split]
        picks = random.Random(seed).sample(range(len(labels)), count)
        lines = []
        for i in picks:
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(images[i]).convert("RGB").save(root / name)
            lines.append(f"{name} {int(labels[i])}")
        lists[split] = lines
    cut = round(0.8 * train)
    files = {"train800val200.txt": lists["train"], "train800.txt": lists["train"][:cut],
             "val200.txt": lists["train"][cut:], "test.txt": lists["test"]}  # fmt: skip
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="VTAB-1k helpers.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-fashion", help="write Fashion-MNIST as a VTAB-1k list folder")
    export.add_argument("directory")
    export.add_argument("--train", type=int, default=1000)
    export.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    print(export_fashion(args.directory, args.train, args.test))


if __name__ == "__main__":
    main()
