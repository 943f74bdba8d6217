"""Training a new head on a frozen backbone: our linear-probe stage vs the usual frozen-backbone epochs.

These are two ways to the same result (a trained head on frozen ImageNet features), not the same computation, so
the figure is time to a trained head, with the validation accuracy each reaches beside it:
  ours:  the backbone's features of the cached centre crops computed once (one forward pass per image), then 100
         full-batch steps of the head on those features (`pupil train --stages probe`, the probe's own timing);
  usual: every epoch, every training image decoded, augmented and passed through the frozen backbone, the head
         stepped per batch, validation after each epoch (fastai's frozen `fit_one_cycle`, the Keras
         transfer-learning tutorial), 10 epochs.
Same 320 + 80 ELPV images, efficientnet_lite0 at 224 px, the same allocator settings, one process each, both cores.
Repeats: ours 3 whole probes; usual: 3 measured epochs, its 10-epoch time taken as 10 x the median epoch
(10 epochs 3 times would take 40 minutes here).

    python -m bench.probe_speed [--per-class 160] [--epochs 10]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header, row, spread
from models.runtime import OneLineParser

ALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def run_ours(data: str, args) -> dict:
    from training.config import TrainConfig
    from training.fit import fit

    with tempfile.TemporaryDirectory() as out:
        cfg = dict(data=data, model="efficientnet_lite0", img_size=args.img_size, stages="probe",
                   limit_per_class=args.per_class, out=out, progress=False, patience=0)
        fit(TrainConfig(**cfg))  # warm the decode cache: decoding is benchmarked in bench.data_pipeline
        seconds, acc = [], []
        for _ in range(3):
            p = fit(TrainConfig(**cfg)).metrics["probe"]
            seconds.append(p["feature_seconds"] + p["head_seconds"])
            acc.append(p["val_acc"])
        split = json.loads((Path(out) / "split.json").read_text())
    return {"seconds": seconds, "val_acc": acc, "train": split["train"], "val": split["val"]}


def run_usual(data: str, split: dict, args) -> dict:
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
    val_tf = transforms.Compose([transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size),
                                 transforms.ToTensor(), norm])
    with tempfile.TemporaryDirectory() as d:
        for part in ("train", "val"):
            for rel in split[part]:
                (Path(d) / part / Path(rel).parent).mkdir(parents=True, exist_ok=True)
                os.symlink(Path(data) / rel, Path(d) / part / rel)
        tr = torch.utils.data.DataLoader(datasets.ImageFolder(f"{d}/train", train_tf), batch_size=32, shuffle=True,
                                         num_workers=1)
        va = torch.utils.data.DataLoader(datasets.ImageFolder(f"{d}/val", val_tf), batch_size=64, num_workers=1)
        opt = torch.optim.AdamW(model.get_classifier().parameters(), lr=1e-3)
        epochs, acc = [], 0.0
        for _ in range(3):
            t0 = time.perf_counter()
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
            epochs.append(time.perf_counter() - t0)
            acc = correct / len(va.dataset)
    return {"epoch_seconds": epochs, "val_acc_after_3": acc}


def main() -> None:
    ap = OneLineParser()
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--role", choices=("ours", "usual"))
    ap.add_argument("--split")
    args = ap.parse_args()
    if args.role:
        from pupil.demo import materialise_elpv

        data = str(materialise_elpv())
        out = run_ours(data, args) if args.role == "ours" else run_usual(data, json.loads(Path(args.split).read_text()), args)
        print(json.dumps(out))
        return
    header(f"a trained head: linear probe on features computed once vs {args.epochs} frozen-backbone epochs")
    base = [sys.executable, "-m", "bench.probe_speed", "--per-class", str(args.per_class), "--img-size",
            str(args.img_size), "--epochs", str(args.epochs)]
    env = {**os.environ, **ALLOC, "PUPIL_NO_REEXEC": "1"}  # the same allocator settings on both sides
    ours = json.loads(subprocess.run(base + ["--role", "ours"], capture_output=True, text=True, check=True,
                                     env=env).stdout.strip().splitlines()[-1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"train": ours["train"], "val": ours["val"]}, f)
    usual = json.loads(subprocess.run(base + ["--role", "usual", "--split", f.name], capture_output=True,
                                      text=True, check=True, env=env).stdout.strip().splitlines()[-1])
    print(f"images: {len(ours['train'])} train, {len(ours['val'])} validation ({args.img_size}px, efficientnet_lite0)")
    print(row("ours: features once + 100 head steps", ours["seconds"], "s", 40)
          + f"   validation accuracy {ours['val_acc'][0]:.3f}")
    print(row("usual: one frozen-backbone epoch", usual["epoch_seconds"], "s", 40)
          + f"   validation accuracy {usual['val_acc_after_3']:.3f} after 3")
    total = args.epochs * spread(usual["epoch_seconds"])["median"]
    print(f"usual, {args.epochs} epochs: {total:.0f} s ({args.epochs} x the median epoch)")
    print(f"time to a trained head, usual {args.epochs} epochs / ours: "
          f"{total / spread(ours['seconds'])['median']:.1f}x (ratio of medians)")


if __name__ == "__main__":
    main()
