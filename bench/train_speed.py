"""Epoch wall time of our fine-tune vs a plain PyTorch loop, same data, model, image size and batch.

ours:  decode cache, batch augmentation, channels_last, frozen BN statistics, the allocator settings of the CLI
plain: torchvision ImageFolder + PIL RandomResizedCrop/flip per image, DataLoader (same workers), NCHW, fp32,
       default allocator: the loop of most tutorials

Each side runs in its own process (the allocator is fixed at process start), 3 epochs; the best of the epochs after
the first is reported (the first warms allocators and caches).

    python -m bench.train_speed [--per-class 160] [--img-size 224] [--model efficientnet_lite0]
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


def run_ours(data: str, out: str, args) -> dict:
    from training.fit import TrainConfig, fit

    r = fit(TrainConfig(data=data, model=args.model, img_size=args.img_size, epochs=3, stages="finetune",
                        limit_per_class=args.per_class, batch_size=args.batch, out=out, patience=0, progress=False,
                        val_split=0.2))
    n_train = sum(r.metrics["counts"]["train"].values())
    epoch_s = [n_train / h["images_per_s"] for h in r.history]
    split = json.loads((Path(out) / "split.json").read_text())
    return {"epoch_seconds": epoch_s, "images": n_train, "train_files": split["train"]}


def run_plain(data: str, files: list[str], args) -> dict:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from models import create_model

    with tempfile.TemporaryDirectory() as d:
        for rel in files:  # exactly the same training images as ours, as an ImageFolder
            (Path(d) / Path(rel).parent).mkdir(parents=True, exist_ok=True)
            os.symlink(Path(data) / rel, Path(d) / rel)
        model, spec = create_model(args.model, 2, "auto", img_size=args.img_size)
        tf = transforms.Compose([transforms.RandomResizedCrop(spec.input_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
        ds = datasets.ImageFolder(d, transform=tf)
        dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=2, drop_last=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        epoch_s = []
        for _ in range(3):
            model.train()
            t0 = time.perf_counter()
            for x, y in dl:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            epoch_s.append(time.perf_counter() - t0)
        return {"epoch_seconds": epoch_s, "images": len(dl) * args.batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--role", choices=("ours", "plain"))
    ap.add_argument("--files")
    args = ap.parse_args()
    if args.role:
        from pupil.demo import materialise_elpv

        data = str(materialise_elpv())
        if args.role == "ours":
            with tempfile.TemporaryDirectory() as out:
                print(json.dumps(run_ours(data, out, args)))
        else:
            print(json.dumps(run_plain(data, json.loads(Path(args.files).read_text()), args)))
        return

    header(f"training epoch time: ours vs a plain PyTorch loop ({args.model}, {args.img_size}px, batch {args.batch})")
    base = [sys.executable, "-m", "bench.train_speed", "--per-class", str(args.per_class), "--img-size",
            str(args.img_size), "--batch", str(args.batch), "--model", args.model]
    env_plain = {k: v for k, v in os.environ.items() if k not in ALLOC}
    ours = json.loads(subprocess.run(base + ["--role", "ours"], capture_output=True, text=True, check=True,
                                     env={**os.environ, **ALLOC}).stdout.strip().splitlines()[-1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ours["train_files"], f)
    plain = json.loads(subprocess.run(base + ["--role", "plain", "--files", f.name], capture_output=True, text=True,
                                      check=True, env=env_plain).stdout.strip().splitlines()[-1])
    o, p = min(ours["epoch_seconds"][1:]), min(plain["epoch_seconds"][1:])
    print(f"training images per epoch: {ours['images']} (ours), {plain['images']} (plain)")
    print(f"ours:  epochs {', '.join(f'{s:.1f}' for s in ours['epoch_seconds'])} s -> {ours['images'] / o:.1f} img/s")
    print(f"plain: epochs {', '.join(f'{s:.1f}' for s in plain['epoch_seconds'])} s -> {plain['images'] / p:.1f} img/s")
    print(f"ratio (images/s, ours/plain): {(ours['images'] / o) / (plain['images'] / p):.2f}x   (target >= 2x)")


if __name__ == "__main__":
    main()
