"""Images/s for one epoch of loading + augmenting 224 px batches from 2000x1500 JPEGs.

ours:     the warm decode cache (uint8 memmap at 256 px) + batch random-resized-crop/flip + normalise
baseline: torchvision ImageFolder + RandomResizedCrop/RandomHorizontalFlip/ToTensor/Normalize, DataLoader with the
          same number of workers (what timm's and torchvision's reference scripts and fastai do every epoch)

    python -m bench.data_pipeline [--n 1000] [--workers 2]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import Timer, header, real_size_jpegs


def ours(root, size: int, batch: int, workers: int, cache_dir) -> tuple[float, float, int]:
    from models.preprocess import normalize
    from training.data import DecodeCache, ImageSet, iterate, random_resized_crop_flip, scan

    m = scan(root)
    with Timer() as cold:
        cache = DecodeCache.build(root, m.usable(), round(size / 0.875), cache_dir=cache_dir, workers=workers)
    images = ImageSet.from_records(cache, m.usable(), m.classes)
    gen = torch.Generator().manual_seed(0)
    n = 0
    with Timer() as warm:
        for idx in iterate(len(images), batch, shuffle=True, generator=gen):
            x, y = images.batch(idx)
            x = random_resized_crop_flip(x.permute(0, 3, 1, 2).float(), size, generator=gen)
            x = normalize(x.permute(0, 2, 3, 1), (0.5,) * 3, (0.5,) * 3)
            n += len(y)
    return n / warm.seconds, cold.seconds, n


def baseline(root, size: int, batch: int, workers: int) -> tuple[float, int]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    n = 0
    with Timer() as t:
        for x, y in dl:
            n += len(y)
    return n / t.seconds, n


def main() -> None:
    from models.runtime import ensure_allocator_env

    ensure_allocator_env()  # as the pupil CLI does
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    header("data pipeline: one epoch of 224 px augmented batches from 2000x1500 JPEGs")
    root = real_size_jpegs(args.n)
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        ours_ips, cold_s, n1 = ours(root, args.size, args.batch, args.workers, cache_dir)
        base_ips, n2 = baseline(root, args.size, args.batch, args.workers)
    print(f"images: {n1} (ours), {n2} (baseline); workers: {args.workers}")
    print(f"ours, cold (first run: decode once into the cache): {n1 / cold_s:8.1f} img/s ({cold_s:.1f} s)")
    print(f"ours, warm cache (every later epoch and run):       {ours_ips:8.1f} img/s")
    print(f"torchvision ImageFolder + PIL transforms:           {base_ips:8.1f} img/s")
    print(f"ratio warm/baseline: {ours_ips / base_ips:.1f}x   (target >= 5x)")
    print(f"ratio cold/baseline: {(n1 / cold_s) / base_ips:.2f}x")


if __name__ == "__main__":
    main()
