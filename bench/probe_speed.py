"""The linear-probe stage vs training the head with the frozen backbone in the loop every epoch (fastai's frozen
`fit_one_cycle`, the Keras transfer-learning tutorial), 10 epochs, same images, model and size, validation included.

ours:     backbone features of the (cached) centre crops computed once, then the head trained on them
baseline: ImageFolder + PIL augmentation + frozen backbone forward every batch of every epoch, validation each epoch

    python -m bench.probe_speed [--per-class 160] [--epochs 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header

ALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def run_ours(data: str, args) -> dict:
    from training.fit import TrainConfig, fit

    with tempfile.TemporaryDirectory() as out:
        cfg = dict(data=data, model="efficientnet_lite0", img_size=args.img_size, stages="probe",
                   limit_per_class=args.per_class, out=out, progress=False, patience=0)
        fit(TrainConfig(**cfg))  # warm the decode cache: decoding is benchmarked in bench.data_pipeline
        t0 = time.perf_counter()
        r = fit(TrainConfig(**cfg))
        total = time.perf_counter() - t0
        split = json.loads((Path(out) / "split.json").read_text())
    p = r.metrics["probe"]
    return {"seconds": p["feature_seconds"] + p["head_seconds"], "run_seconds": total, "val_acc": p["val_acc"],
            "train": split["train"], "val": split["val"]}


def run_baseline(data: str, split: dict, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from models import create_model

    model, spec = create_model("efficientnet_lite0", 2, "auto", img_size=args.img_size)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.get_classifier().parameters():
        p.requires_grad = True
    norm = transforms.Normalize(spec.mean, spec.std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(spec.input_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(round(spec.input_size / spec.crop_pct)),
                                 transforms.CenterCrop(spec.input_size), transforms.ToTensor(), norm])
    with tempfile.TemporaryDirectory() as d:
        for part in ("train", "val"):
            for rel in split[part]:
                (Path(d) / part / Path(rel).parent).mkdir(parents=True, exist_ok=True)
                os.symlink(Path(data) / rel, Path(d) / part / rel)
        tr = torch.utils.data.DataLoader(datasets.ImageFolder(f"{d}/train", train_tf), batch_size=32, shuffle=True,
                                         num_workers=2)
        va = torch.utils.data.DataLoader(datasets.ImageFolder(f"{d}/val", val_tf), batch_size=64, num_workers=2)
        opt = torch.optim.AdamW(model.get_classifier().parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            for x, y in tr:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in va:
                    correct += int((model(x).argmax(1) == y).sum())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "val_acc": correct / len(va.dataset)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--role", choices=("ours", "baseline"))
    ap.add_argument("--split")
    args = ap.parse_args()
    if args.role:
        from pupil.demo import materialise_elpv

        data = str(materialise_elpv())
        out = run_ours(data, args) if args.role == "ours" else run_baseline(data, json.loads(Path(args.split).read_text()), args)
        print(json.dumps(out))
        return
    header(f"head training: linear probe on cached features vs frozen backbone in the loop, {args.epochs} epochs")
    base = [sys.executable, "-m", "bench.probe_speed", "--per-class", str(args.per_class), "--img-size",
            str(args.img_size), "--epochs", str(args.epochs)]
    ours = json.loads(subprocess.run(base + ["--role", "ours"], capture_output=True, text=True, check=True,
                                     env={**os.environ, **ALLOC}).stdout.strip().splitlines()[-1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"train": ours["train"], "val": ours["val"]}, f)
    env = {k: v for k, v in os.environ.items() if k not in ALLOC}
    base_r = json.loads(subprocess.run(base + ["--role", "baseline", "--split", f.name], capture_output=True,
                                       text=True, check=True, env=env).stdout.strip().splitlines()[-1])
    print(f"images: {len(ours['train'])} train, {len(ours['val'])} val ({args.img_size}px, efficientnet_lite0)")
    print(f"ours (features once + 100 head steps): {ours['seconds']:7.1f} s   val acc {ours['val_acc']:.3f}"
          f"   (whole `pupil train --stages probe` run on a warm cache: {ours['run_seconds']:.1f} s)")
    print(f"frozen backbone in the loop, {args.epochs} epochs: {base_r['seconds']:7.1f} s   val acc {base_r['val_acc']:.3f}")
    print(f"ratio: {base_r['seconds'] / ours['seconds']:.1f}x   (target >= 20x)")


if __name__ == "__main__":
    main()
