"""On the demo data (ELPV: 8-bit grayscale electroluminescence images of solar cells), the same fine-tune twice:
RGB replication (the gray image copied into three channels, the pretrained model as is) vs a 1-channel model
(`--in-chans 1`: the pretrained stem's RGB filters summed, timm's adapt_input_conv). Same split, seed, epochs and
images; side by side in one run. The two start from the same function on gray input, so what can differ is the
cost of the stem and what the fine-tune makes of it.

    python -m bench.gray_vs_rgb [--epochs 5] [--per-class 240] [--img-size 160]
"""
from __future__ import annotations

import tempfile
import time

import numpy as np

from bench.common import elpv_images, header
from models.runtime import OneLineParser


def main() -> None:
    from models.runtime import ensure_allocator_env

    ensure_allocator_env()  # as the pupil CLI does
    ap = OneLineParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=240)
    ap.add_argument("--img-size", type=int, default=160)
    args = ap.parse_args()
    from models.predictor import Predictor
    from pupil.demo import materialise_elpv
    from training.fit import TrainConfig, fit

    header(f"RGB replication vs 1-channel stem on ELPV ({args.epochs} epochs, {args.per_class}/class, "
           f"{args.img_size}px, efficientnet_lite0 with bundled ImageNet weights)")
    data = str(materialise_elpv())
    sample = [p for p, _ in elpv_images()[:64]]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for chans in (3, 1):
            r = fit(TrainConfig(data=data, model="efficientnet_lite0", epochs=args.epochs, img_size=args.img_size,
                                limit_per_class=args.per_class, patience=0, in_chans=chans, out=f"{out}/c{chans}",
                                progress=False))
            pred = Predictor(r.artifact_dir, device="cpu", backend="torch")
            arrays = np.stack([pred.load(p) for p in sample])
            pred.logits(arrays[:8])  # warm-up
            t0 = time.perf_counter()
            for _ in range(3):
                pred.logits(arrays)
            ms = (time.perf_counter() - t0) / (3 * len(arrays)) * 1000
            v = r.metrics["val"]
            rows.append((chans, v["accuracy"], v["macro_f1"], v["ece"], r.metrics["train_images_per_s"], ms,
                         r.metrics["wall_time_s"], v["n"]))
    print(f"{'input':<22}{'accuracy':>10}{'macro-F1':>10}{'ECE':>8}{'train img/s':>13}{'infer ms/img':>14}{'wall s':>8}{'val n':>7}")
    for c, a, f, e, ips, ms, w, n in rows:
        name = "RGB replication" if c == 3 else "1 channel (summed)"
        print(f"{name:<22}{a:>10.3f}{f:>10.3f}{e:>8.3f}{ips:>13.1f}{ms:>14.2f}{w:>8.0f}{n:>7}")
    (_, a3, f3, _, i3, m3, _, _), (_, a1, f1, _, i1, m1, _, _) = rows
    print(f"1 channel minus RGB: accuracy {a1 - a3:+.3f}, macro-F1 {f1 - f3:+.3f}; "
          f"training speed x{i1 / i3:.2f}, inference time x{m1 / m3:.2f}")


if __name__ == "__main__":
    main()
