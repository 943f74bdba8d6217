"""Images/s for epochs of loading + augmenting 224 px batches from 2000x1500 JPEGs, ours vs torchvision's ImageFolder.

Both sides do the same work: the same files, batch 32, the same crop policy (the shorter side resized to 256, the
centre square, a random-resized crop of 35-100 % of it to 224 px, a horizontal flip half the time, normalised), the
same allocator settings (this process's), 2 decoding workers on both sides.
  ours:      the first run decodes every file once into the uint8 cache (2 worker processes), then the epoch is
             batches from the memory-mapped cache, augmented in this process;
  torchvision: ImageFolder + PIL transforms in a DataLoader with 2 workers, every epoch (what the reference scripts,
             timm's train.py and fastai do).
Timed: the first epoch end to end (ours: building the cache, then the epoch; theirs: an epoch) and later epochs, 3 repeats
each (the cache rebuilt from empty for each cold repeat). A second row runs torchvision with its own default policy
(RandomResizedCrop of 8-100 % of the full 2000x1500 image) for reference; the headline compares the same policy.

    python -m bench.data_pipeline [--n 1000] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import header, ratio, real_size_jpegs, row
from models.runtime import OneLineParser

SCALE = (0.35, 1.0)


def ours_epoch(images, size: int, batch: int, seed: int) -> int:
    from models.preprocess import normalize
    from training.augment import random_resized_crop_flip
    from training.data import iterate

    gen = torch.Generator().manual_seed(seed)
    n = 0
    for idx in iterate(len(images), batch, shuffle=True, generator=gen):
        x, y = images.batch(idx)
        x = random_resized_crop_flip(x.permute(0, 3, 1, 2).float(), size, scale=SCALE, generator=gen)
        normalize(x.permute(0, 2, 3, 1), (0.5,) * 3, (0.5,) * 3)
        n += len(y)
    return n


def ours(root: Path, size: int, batch: int, workers: int, repeats: int) -> tuple[list[float], list[float]]:
    from training.cache import DecodeCache
    from training.data import ImageSet
    from training.manifest import scan

    m = scan(root)
    cold, warm = [], []
    for r in range(repeats):
        cache_dir = Path(tempfile.mkdtemp())
        try:
            t0 = time.perf_counter()
            cache = DecodeCache.build(root, m.usable(), round(size / 0.875), cache_dir=cache_dir, workers=workers)
            images = ImageSet.from_records(cache, m.usable(), m.classes)
            n = ours_epoch(images, size, batch, r)
            cold.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            n = ours_epoch(images, size, batch, 100 + r)
            warm.append(n / (time.perf_counter() - t0))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return cold, warm


def torchvision_epochs(root: Path, size: int, batch: int, workers: int, repeats: int, same_policy: bool) -> list[float]:
    from torchvision import datasets, transforms

    if same_policy:
        crop = [transforms.Resize(round(size / 0.875)), transforms.CenterCrop(round(size / 0.875)),
                transforms.RandomResizedCrop(size, scale=SCALE)]
    else:
        crop = [transforms.RandomResizedCrop(size)]
    tf = transforms.Compose([*crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    dl = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=tf), batch_size=batch, shuffle=True,
                                     num_workers=workers)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in dl)
        out.append(n / (time.perf_counter() - t0))
    return out


def main() -> None:
    from models.runtime import ensure_allocator_env

    ensure_allocator_env()  # as the pupil CLI does: both sides run in this process, with these settings
    ap = OneLineParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    header(f"data pipeline: epochs of {args.size} px augmented batches from 2000x1500 JPEGs")
    root = real_size_jpegs(args.n)
    cold, warm = ours(root, args.size, args.batch, args.workers, args.repeats)
    same = torchvision_epochs(root, args.size, args.batch, args.workers, args.repeats, same_policy=True)
    default = torchvision_epochs(root, args.size, args.batch, args.workers, args.repeats, same_policy=False)
    print(f"{args.n} images, batch {args.batch}, {args.workers} workers on both sides")
    print(row("ours, first epoch (cache built + epoch)", cold, "img/s"))
    print(row("ours, later epochs (warm cache)", warm, "img/s"))
    print(row("torchvision, same crop policy (every epoch)", same, "img/s"))
    print(row("torchvision, its default policy (8-100 %)", default, "img/s"))
    print(ratio("later epochs, ours / torchvision (same policy)", warm, same))
    print(ratio("first epoch, ours / torchvision (same policy)", cold, same))


if __name__ == "__main__":
    main()
