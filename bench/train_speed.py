"""Training epoch speed: a plain PyTorch loop, then each of our techniques added one at a time, then `pupil train`.

Every row trains the same model (efficientnet_lite0, bundled weights, 224 px) on the same 320 ELPV images, batch
32, AdamW, with the same crop policy (the centre 256 px square, a random-resized crop of 35-100 % of it, a flip),
4 epochs; the first warms up and the next 3 are the repeats. Each row runs in its own process (the allocator is
fixed at process start); its torch uses both cores.

  plain                ImageFolder + PIL transforms, DataLoader with 1 worker (a second would fight the two
                       training threads for the two cores), NCHW, BatchNorm statistics updated, default allocator
  + allocator          glibc keeps freed activations (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, as `pupil` sets)
  + decode cache       batches from the uint8 cache, augmented in the training process (no loader, no decoding)
  + channels_last      the model and batches in channels_last memory
  + frozen BN stats    BatchNorm running statistics fixed (pupil's default for pretrained models): a different
                       computation (no batch statistics), shown as its own row
  + bf16 autocast      torch.autocast("cpu", bfloat16) around the forward pass (AVX512-BF16 here): the same
                       computation at another precision (weights, optimizer and loss stay fp32)
  + 2 stages frozen    the stem and the first 2 stages fixed (--freeze-stages 2): LESS work (no backward through
                       the early, high-resolution layers), shown as its own row
  pupil train (before) the product with the previous default's precision and layers (--amp off --freeze-stages 0;
                       its crop, evaluation crop and rates are today's), the loop of the "+ frozen BN stats" row with
                       its bookkeeping (--stages finetune)
  pupil train (whole bf16)  today's defaults with --amp bf16: the whole model steps under bf16 autocast, as
                       `--amp auto` did on this CPU before the split precision (training.views.split_precision)
  pupil train          the product with today's defaults (on this CPU: the frozen stem and stages under bf16
                       autocast, the layers that learn in fp32; --freeze-stages as the default says)

    python -m bench.train_speed [--per-class 160] [--img-size 224] [--only "pupil train (whole bf16),pupil train"]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header, ratio, row
from models.runtime import OneLineParser

ALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
VARIANTS = {  # name: (allocator, cache, channels_last, frozen BN, bf16, frozen stages)
    "plain": (False, False, False, False, False, 0),
    "+ allocator": (True, False, False, False, False, 0),
    "+ decode cache": (True, True, False, False, False, 0),
    "+ channels_last": (True, True, True, False, False, 0),
    "+ frozen BN stats": (True, True, True, True, False, 0),
    "+ bf16 autocast": (True, True, True, True, True, 0),
    "+ 2 stages frozen": (True, True, True, True, True, 2),
}
PUPIL = {"pupil train (before)": {"amp": "off", "freeze_stages": 0}, "pupil train (whole bf16)": {"amp": "bf16"},
         "pupil train": {}}
EPOCHS = 4


def files(args) -> tuple[str, list[str]]:
    """The ELPV folder and the same 320 training images for every row (pupil's own seeded split)."""
    from pupil.demo import materialise_elpv
    from training.manifest import scan, split_manifest
    from training.prepare import limit_per_class

    data = materialise_elpv()
    m = split_manifest(scan(data), 0.2, 0)
    limit_per_class(m, args.per_class, 0)
    return str(data), [f.path for f in m.usable("train")]


def run_variant(name: str, data: str, train: list[str], args) -> list[float]:
    import torch
    import torch.nn.functional as F

    from models import create_model
    from models.preprocess import normalize
    from training.augment import random_resized_crop_flip

    from training.prepare import freeze_early

    _, use_cache, channels_last, frozen_bn, bf16, frozen = VARIANTS[name]
    torch.manual_seed(0)
    model, spec = create_model("efficientnet_lite0", 2, "auto", img_size=args.img_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if frozen:
        freeze_early(model, frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = cache_batches(data, train, spec, gen) if use_cache else folder_batches(data, train, spec)
    times = []
    for _ in range(EPOCHS):
        model.train()
        if frozen_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        t0 = time.perf_counter()
        n = 0
        for x, y in batches():
            if use_cache:
                x = random_resized_crop_flip(x.permute(0, 3, 1, 2).float(), spec.input_size, generator=gen)
                x = normalize(x.permute(0, 2, 3, 1), spec.mean, spec.std)
            x = x.contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        times.append(n / (time.perf_counter() - t0))
    return times[1:]


def cache_batches(data: str, train: list[str], spec, gen):
    from training.cache import DecodeCache
    from training.data import ImageSet, iterate
    from training.manifest import scan

    m = scan(data)
    recs = [f for f in m.usable() if f.path in set(train)]
    cache = DecodeCache.build(data, recs, spec.resize_size, interpolation=spec.interpolation)
    images = ImageSet.from_records(cache, recs, m.classes)

    def batches():
        for idx in iterate(len(images), 32, shuffle=True, generator=gen, drop_last=True):
            yield images.batch(idx)

    return batches


def folder_batches(data: str, train: list[str], spec):
    import torch
    from torchvision import datasets, transforms

    d = tempfile.mkdtemp()
    for rel in train:  # exactly the same training images, as an ImageFolder
        (Path(d) / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        os.symlink(Path(data) / rel, Path(d) / rel)
    tf = transforms.Compose([transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.resize_size),
                             transforms.RandomResizedCrop(spec.input_size, scale=(0.35, 1.0)),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(spec.mean, spec.std)])
    dl = torch.utils.data.DataLoader(datasets.ImageFolder(d, transform=tf), batch_size=32, shuffle=True,
                                     num_workers=1, drop_last=True)
    return lambda: iter(dl)


def run_pupil(data: str, args, settings: dict) -> list[float]:
    from training.config import TrainConfig
    from training.fit import fit

    with tempfile.TemporaryDirectory() as out:
        r = fit(TrainConfig(data=data, img_size=args.img_size, epochs=EPOCHS, stages="finetune", patience=0,
                            limit_per_class=args.per_class, out=out, progress=False, **settings))
    return [h["images_per_s"] for h in r.history][1:]


def main() -> None:
    ap = OneLineParser()
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--role")
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: every row)")
    args = ap.parse_args()
    if args.role:
        data, train = files(args)
        out = run_pupil(data, args, PUPIL[args.role]) if args.role in PUPIL else run_variant(args.role, data, train,
                                                                                            args)
        print(json.dumps(out))
        return
    header(f"training epoch speed: efficientnet_lite0, {args.img_size}px, batch 32, the same 320 ELPV images")
    results = {}
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(only) - set(VARIANTS) - set(PUPIL)
    if unknown:
        ap.error(f"--only: no row named {sorted(unknown)}")
    for name in only or [*VARIANTS, *PUPIL]:
        alloc = name in PUPIL or VARIANTS[name][0]
        env = {**os.environ, **ALLOC} if alloc else {k: v for k, v in os.environ.items() if k not in ALLOC}
        cmd = [sys.executable, "-m", "bench.train_speed", "--per-class", str(args.per_class), "--img-size",
               str(args.img_size), "--role", name]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PUPIL_NO_REEXEC": "1"})
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(row(name, results[name], "img/s", 22), flush=True)
    for other in ("plain", "pupil train (before)", "pupil train (whole bf16)"):
        if "pupil train" in results and other in results:
            print(ratio(f"pupil train / {other}", results["pupil train"], results[other]))
    names = [n for n in VARIANTS if n in results]
    for before, after in zip(names, names[1:]):
        print(ratio(f"  {after} (over the row above)", results[after], results[before]))


if __name__ == "__main__":
    main()
