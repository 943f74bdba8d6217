"""On the demo data (ELPV solar cells, functional vs defective): fine-tuned efficientnet_lite0 (bundled ImageNet
weights) vs small_cnn from scratch, each given the same wall-clock budget for its whole `pupil train` run on this
machine (`--time-limit`), same split, same seed. Published reference (Deitsch et al., 2019): a fine-tuned ImageNet
CNN 88.4 % average accuracy, an SVM on hand-crafted features 82.4 %.

    python -m bench.transfer_vs_scratch [--minutes 5]
"""
from __future__ import annotations

import tempfile

from bench.common import header
from models.runtime import OneLineParser


def main() -> None:
    from models.runtime import ensure_allocator_env

    ensure_allocator_env()  # as the pupil CLI does
    ap = OneLineParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--img-size", type=int, default=224)
    args = ap.parse_args()
    from pupil.demo import materialise_elpv
    from training.fit import TrainConfig, fit

    header(f"transfer vs scratch on ELPV, {args.minutes:g} minutes each")
    data = str(materialise_elpv())
    rows = []
    with tempfile.TemporaryDirectory() as out:
        # each at its own default resolution: 224 px for the ImageNet model, 128 px for the baseline
        for model, extra in (("efficientnet_lite0", {"img_size": args.img_size}), ("small_cnn", {"width": 32})):
            r = fit(TrainConfig(data=data, model=model, epochs=100, time_limit=args.minutes,
                                patience=0, out=f"{out}/{model}", progress=False, **extra))
            v = r.metrics["val"]
            rows.append((model, r.metrics["epochs_run"], r.metrics["wall_time_s"], v["accuracy"],
                         v["balanced_accuracy"], v["macro_f1"], v["ece"], v["n"]))
    print(f"{'model':<20}{'epochs':>7}{'wall s':>8}{'accuracy':>10}{'bal. acc':>10}{'macro-F1':>10}{'ECE':>8}{'val n':>7}")
    for m, e, w, a, b, f, c, n in rows:
        print(f"{m:<20}{e:>7}{w:>8.0f}{a:>10.3f}{b:>10.3f}{f:>10.3f}{c:>8.3f}{n:>7}")
    (_, _, _, a1, b1, f1, _, _), (_, _, _, a2, b2, f2, _, _) = rows
    print(f"fine-tuned minus scratch: accuracy {a1 - a2:+.3f}, balanced accuracy {b1 - b2:+.3f}, macro-F1 {f1 - f2:+.3f}")
    print("published: fine-tuned ImageNet CNN 0.884 (full resolution, full training), SVM on features 0.824")


if __name__ == "__main__":
    main()
