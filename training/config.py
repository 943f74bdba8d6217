"""TrainConfig: every knob of `pupil train`, each documented once, here. The defaults are the recipe.

The recipe's defaults changed by issue 24 (--crop affine, --eval-crop 1, --backbone-lr 0.3, --freeze-stages 2, and bf16
on a CPU that has it: models.runtime.amp_dtype) were chosen as one bundle by `python -m bench.recipe` on validation
splits only (BENCHMARKS.md, "Recipe study", rows today/new): within noise of the previous defaults on faces and ELPV
binary, +2.2 points on digits, at 1.18x the training speed (BENCHMARKS.md, "Training speed with bf16 and frozen
stages"; the goal was 2x). One seed per task: the study's own caveat.

--epochs 20 (it was 10) is issue 27's change, by its rule (a paired difference over 3 seeds beyond one standard error
on the tasks it is for, and no task lost by more than one), on validation splits only (each seed its own split):
ELPV 4-class balanced accuracy +6.7 ± 0.8 points and binary +3.8 ± 0.2 (bench/results/study-gpu.jsonl, rung gpu,
e20 against new), digits +0.6 ± 0.1, faces 0.0 ± 1.9, ELPV type 0.0 ± 0.0 (every run at 1.000, the task's ceiling)
(bench/results/study.jsonl, rung confirm); BENCHMARKS.md, "Recipe study on a lent GPU". 30 epochs was no better than
20. Early stopping (--patience 5) ends a run that stopped improving, so an easy set pays less than double (ELPV type
stopped after 6-10 epochs either way; digits ran 13, 18 and 20 of 20).

--img-size auto (0) means 288 px for the default model fine-tuned without --time-limit on images whose median shorter
side is at least 288 px (training/prepare.py auto_img_size), by the same rule on validation splits only, with today's
20-epoch defaults as the baseline (each seed its own split; BENCHMARKS.md, "Round 2 on this CPU"): ELPV 4-class
balanced accuracy +3.1 ± 2.7 and macro-F1 +2.0 ± 1.5 points over 5 seeds (bench/results/fourclass-round2.jsonl,
default-res288 against default), ELPV binary balanced +1.4 ± 1.0, accuracy +0.4 ± 0.5 over 3 seeds
(bench/results/binary-round2.jsonl), ELPV type accuracy -0.08 ± 0.08 (one image of 394 on one seed; a loss of one
error, not more: bench/results/type-round2.jsonl); digits (32 px) and faces (100 px) are below the threshold and
unchanged. Under --time-limit 224 px stays: in 10 minutes on ELPV binary 288 px fitted 6-7
epochs against 11-12 and scored accuracy -0.5 ± 1.1, balanced -1.8 ± 1.8 points over 3 seeds on validation
(bench/results/binary-round3.jsonl, default-tl10-res288 against default-tl10; BENCHMARKS.md, "288 px under
`--time-limit 10`"). On the test quarter (a report, not a choice: BENCHMARKS.md, "The defaults at 288 px"), the
same 4-class runs scored balanced accuracy -2.2 ± 2.5 points against the 224-px defaults, within its error (the
validation margin was thin; five more validation seeds since, 5-9, bench/results/fourclass-round3.jsonl r3-res224
against default, gave +1.2 ± 2.0 balanced and +0.5 ± 1.0 macro-F1, within their errors, and all 10 pairs +2.1 ± 1.6
balanced, +1.3 ± 0.9 macro-F1, +0.5 ± 1.2 accuracy: still beyond one standard error on balanced accuracy and macro-F1,
not two; BENCHMARKS.md, "Round 3 on this CPU"), and binary +0.8 ± 0.7 over 3 seeds (accuracy 0.893, against 0.891),
within its error too.

The command line is generated from these fields (pupil/cli.py): the flag is the field's name with dashes, the help is
the field's `help` metadata, and `choices`, `or_word` (a number or a word, e.g. `--lr auto`) and `bare` (the value a
flag given without one means, e.g. a bare `--ema`) say how it parses. The resolved config is saved in the run as
config.yaml, and `--config` reads it back.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from models.decoder import DEFAULT_DECODE_TIMEOUT
from models.images import DEFAULT_MAX_PIXELS
from models.artifact import MAX_MEMBERS


def opt(default: Any, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **cli})


# --preset: settings a preset gives the fields the user left unset (flags and a --config file win over it).
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"stages": "probe"},  # the linear probe on cached features: about a minute on 2 cores for 2,000 images
    "default": {},
    # up to an hour on 2 CPU cores: the larger bundled backbone at its own 260 px, a longer schedule fitted to the
    # hour (--time-limit shortens the cosine after the first epoch, it does not cut it off)
    "best": {"model": "efficientnet_lite2", "epochs": 30, "patience": 10, "time_limit": 60.0},
}


def with_preset(settings: dict[str, Any]) -> dict[str, Any]:
    """settings (the fields given, by flag, file or keyword) over their preset's values."""
    name = settings.get("preset") or "default"
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    return {**PRESETS[name], **settings}


@dataclass
class TrainConfig:
    data: str = opt("", "folder with one sub-folder of images per class, or train/ val/ (test/) splits of them")
    preset: str = opt("default", "fast (the linear probe only: about a minute) | default | best (efficientnet_lite2 "
                                 "at 260 px, 30 epochs fitted to a 60-minute --time-limit; on ELPV binary no better than "
                                 "default, on 4-class worse in accuracy, on test and validation: BENCHMARKS.md); "
                                 "flags you give win",
                      choices=tuple(PRESETS))
    labels: str = opt("", "a CSV/TSV of path,label[,split] rows, paths relative to DATA (default: DATA/metadata.csv "
                          "if there is one, else one sub-folder per class)")
    path_col: str = opt("", "the labels table's path column (default: path, file, file_name, filename or image)")
    label_col: str = opt("", "the labels table's label column (default: label, class or target)")
    split_col: str = opt("", "the labels table's split column, train/val/test (default: split, if there is one)")
    model: str = opt("efficientnet_lite0", "timm architecture name, or small_cnn for the from-scratch baseline")
    pretrained: str = opt("auto", "auto (bundled weights when a package ships them, else the hub) | none | hub | "
                                  "PATH to .safetensors/.pth")
    stages: str = opt("both", "probe (head only, on cached features) | finetune | both (small_cnn and --pretrained "
                              "none: finetune only)", choices=("probe", "finetune", "both"))
    epochs: int = opt(20, "fine-tune epochs (the most; early stopping and --time-limit may run fewer; 20 won over 10 "
                          "on validation: BENCHMARKS.md, Recipe study on a lent GPU; 30 with --patience 10 gained nothing "
                          "over 20 on ELPV 4-class: Round 3 on this CPU)")
    probe_epochs: int = opt(100, "full-batch steps of the linear probe on cached features")
    img_size: int = opt(0, "input size in pixels (0: auto, the model's default, 224 for efficientnet_lite0, 128 for "
                           "small_cnn; but 288 for efficientnet_lite0 fine-tuned without --time-limit on images whose "
                           "median shorter side is 288 px or more: it won on ELPV on validation, BENCHMARKS.md, Round 2 "
                           "on this CPU; an epoch costs 1.7-1.8x)")
    batch_size: int = opt(0, "images per step per process (under torchrun the global batch is this times the "
                             "number of processes), or auto (0): 32 on a CPU; on CUDA a power of two from the data (a "
                             "sixteenth of the training set, 32 to 512), halved until a step fits, the learning rate "
                             "then scaled by sqrt(batch / 32) as timm scales it for adaptive optimizers; halved on "
                             "out-of-memory (on ELPV 4-class validation a batch of 16 was level with 32: BENCHMARKS.md, "
                             "TrivialAugment on today's defaults)", or_word=("auto", 0))
    lr: float | str = opt(0.0, "peak learning rate, or auto (the LR range test's suggestion, as `pupil lr-find` "
                               "shows it); 0: 1e-3 pretrained (backbone at --backbone-lr of it; on ELPV 4-class "
                               "validation 3e-3 lost macro-F1 and 3e-4 was level: BENCHMARKS.md, A peak learning rate "
                               "of 3e-3), 3e-3 from scratch",
                          or_word=("auto", "auto"))
    lr_find_steps: int = opt(100, "steps of the learning-rate range test (lr-find, --lr auto)")
    ema: float = opt(0.0, "keep an exponential moving average of the weights with this decay, validate and save it "
                          "(bare --ema: 0.999; 0: off)", bare=0.999)
    in_chans: int = opt(3, "1: a grayscale model, the pretrained stem's RGB filters summed; 3: RGB", choices=(1, 3))
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms and biases)")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy (0 on ELPV 4-class, 3 seeds on "
                                      "validation: accuracy -2.5 +- 1.2 points, balanced accuracy +0.4 +- 0.2: "
                                      "BENCHMARKS.md, Layer-wise learning-rate decay and no label smoothing)")
    mixup: float = opt(0.0, "mixup alpha: Beta(a, a) mixing of image pairs (0: off; 0.2 on ELPV 4-class lost "
                            "macro-F1, -2.8 +- 1.4 points over 3 seeds on validation, and gained nothing: "
                            "BENCHMARKS.md, Round 3 on this CPU)")
    cutmix: float = opt(0.0, "cutmix alpha (0: off); with --mixup too, one of the two per batch")
    crop: str = opt("affine", "training crop: rrc (random-resized crop down to --crop-scale of the area) | affine (the "
                           "full frame under a mild random affine: zoom 0.9-1.1, rotation +-10 degrees, shift +-5 per "
                           "cent, so nothing at the border is cut away)", choices=("rrc", "affine"))
    crop_scale: float = opt(0.35, "smallest area of the random-resized crop, as a fraction of the image (1 with "
                                  "--flips none: no augmentation, the centre crop as at evaluation)")
    eval_crop: float = opt(1.0, "the centre crop at evaluation and serving, as a fraction of the resized image's side "
                                "(1: the full frame; 0: the model's own, 0.875 for efficientnet_lite0)")
    backbone_lr: float = opt(0.3, "the pretrained backbone's learning rate as a fraction of --lr (the new head "
                                  "learns at --lr)")
    lr_decay: float = opt(0.0, "layer-wise learning-rate decay: each stage below the last learns at this fraction of "
                               "the rate of the one above it (0.7 e.g.; 0: every backbone stage at --backbone-lr; 0.7 on "
                               "ELPV 4-class, 6 seeds on validation: balanced accuracy +1.3 +- 1.5 points, macro-F1 "
                               "-0.1 +- 1.2, no finding: BENCHMARKS.md, Layer-wise learning-rate decay and no label smoothing)")
    average_last: int = opt(0, "the model kept as 'last' is the average of the weights after each of the last N "
                               "epochs run, an early stop's too (0 or 1: the last epoch's weights)")
    ordinal: bool = opt(False, "the classes are ordered (in their sorted names' order, e.g. p000 < p033 < p067 < p100): "
                               "label smoothing goes to the neighbouring classes, not to all")
    freeze_stages: int = opt(2, "pretrained models: keep the stem and the first N stages fixed (no gradient, less "
                                "backward work; 0: train every layer, which lost on validation: ELPV 4-class accuracy -2.1 +- 0.8 "
                                "points over 3 seeds, BENCHMARKS.md, Round 3 on this CPU; ELPV binary balanced "
                                "accuracy -1.7 +- 0.8, Recipe study on a lent GPU)")
    cached_views: int = opt(0, "compute the frozen layers (--freeze-stages) once for N augmented views of each "
                               "training image, cycled over the epochs, and train the rest from them (faster epochs; "
                               "fewer views than epochs is a different augmentation: BENCHMARKS.md, Cached views); "
                               "0: recompute them every step")
    view_cache_gb: float = opt(8.0, "the most disk the cached views' folder (in --cache-dir) may take; the least "
                                    "recently used go first, and a run whose views do not fit takes fewer")
    decode_cache_gb: float = opt(8.0, "the most disk the decoded images' folder (in --cache-dir) may take; the least "
                                      "recently used data sets go first (the one in use always stays)")
    flips: str = opt("auto", "auto: decided on validation by the probe (d8 if turning the training images "
                             "does not hurt its validation loss, else h; h without a probe) | h: horizontal flips | "
                             "hv: also vertical | d8: also 90-degree rotations (all 8 symmetries of a square; for "
                             "data with no up or down: cells, slides, tiles) | none",
                     choices=("auto", "h", "hv", "d8", "none"))
    warmup_epochs: float = opt(1.0, "epochs of linear learning-rate warm-up before the cosine decay")
    patience: int = opt(5, "early stopping after N epochs in which the fine-tune did not improve on its own best "
                           "validation score (the probe stays a candidate for the model kept; 0: off)")
    label_issues: bool = opt(True, "find likely label errors among the training and validation images (seconds, on the "
                                   "probe's features): label_issues.csv and a report section")
    drop_label_issues: bool = opt(False, "leave the training images flagged as likely mislabelled out of training "
                                         "(validation images are never dropped); the report says how many. Off by default: on "
                                         "ELPV 4-class it cost 2.0 ± 0.4 points of validation accuracy (it flags a "
                                         "third of the rarest class; BENCHMARKS.md, Round 3 on this CPU)")
    abstain_precision: float = opt(0.95, "confidence threshold chosen so accepted validation answers are this "
                                         "precise (0: never abstain)")
    time_limit: float = opt(0.0, "minutes for the whole run, its finish (calibration, test, export) included as an "
                                 "estimate (0: none); the epochs that fit are run, the cosine ending on the last; fewer "
                                 "when the epochs slow down mid-run")
    augment: str = opt("none", "none | trivial (TrivialAugmentWide: one random operation per image) | randaugment "
                               "(two), before the training crop (--crop) and flips (trivial on ELPV 4-class lost balanced "
                               "accuracy and macro-F1, -3.4 +- 2.4 and -4.7 +- 3.2 points over 3 seeds on validation: "
                               "BENCHMARKS.md, TrivialAugment on today's defaults)",
                       choices=("none", "trivial", "randaugment"))
    balance: str = opt("auto", "auto (posthoc when the largest class is over 3x the smallest, else none) | posthoc "
                               "(logit adjustment after training: the classes' log-priors subtracted, scaled by a "
                               "factor chosen on validation for macro-F1) | sampler (class-balanced sampling: on ELPV "
                               "4-class against posthoc, 3 seeds on validation, macro-F1 -1.3 ± 1.2 points, accuracy "
                               "-3.4 ± 3.2, balanced accuracy +2.0 ± 2.2; BENCHMARKS.md, The class-balanced sampler) | "
                               "loss (class-weighted: on ELPV 4-class -13.6 ± 5.1 points of validation accuracy, "
                               "balanced accuracy not raised; BENCHMARKS.md, Round 3 on this CPU) | none (against "
                               "posthoc on 17 ELPV 4-class models, cross-fitted: accuracy +3.0 ± 0.5 points, balanced "
                               "accuracy -3.6 ± 0.9, macro-F1 -1.8 ± 0.8; BENCHMARKS.md, The logit adjustment's choice)",
                       choices=("auto", "posthoc", "sampler", "loss", "none"))
    amp: str = opt("auto", "auto (bf16/fp16 on CUDA; on a CPU with bf16 instructions bf16 for the frozen layers of "
                           "each training step (the layers that learn in fp32, faster there), the probe's features and "
                           "each epoch's validation, fp32 for the final calibration and test, as served) | off | bf16 "
                           "(the whole step) | fp16",
                   choices=("auto", "off", "bf16", "fp16"))
    freeze_bn: bool = opt(True, "pretrained models: keep BatchNorm running statistics fixed while fine-tuning "
                                "(updating those of the layers that learn, as timm and fastai do, gained nothing on "
                                "ELPV 4-class: BENCHMARKS.md, BatchNorm statistics that learn)")
    compile: bool = opt(False, "torch.compile the model. Off by default, as measured (BENCHMARKS.md): on an H200, "
                               "lite0 at batch 128 gained 2.6 per cent in steady epochs and lost about 12 s compiling, so "
                               "it pays only after some 2.6 million training images (650 epochs of 4,000); not "
                               "measured on a CPU")
    val_split: float = opt(0.2, "fraction held out for validation when DATA has no val/ (valid/, validation/) split")
    seed: int = opt(0, "random seed: split, initialisation, order, augmentation")
    split_seed: int = opt(-1, "the seed of the train/validation split alone (-1: --seed's)")
    ensemble: int = opt(1, "fine-tune N models on one split from N initialisations (seeds --seed, --seed + 1, ...) "
                           "and serve them as one artifact whose answer averages their logits (N times the training "
                           "and the serving compute). On ELPV 4-class, pairs of three recipes scored balanced accuracy "
                           "+1.5 ± 0.4 and macro-F1 +1.2 ± 0.6 points over their members alone on validation, pairs of "
                           "the defaults +0.3 ± 0.8 and +0.9 ± 0.5, and each model up to the fourth added more (the "
                           "third +0.8 ± 0.1 macro-F1, the fourth +0.5 ± 0.4, the fifth nothing measurable); on its test split "
                           "--ensemble 2 scored accuracy +1.2 ± 0.7 and macro-F1 +0.9 ± 0.4 points over the defaults "
                           "(3 seeds, some 50-60 minutes on 2 cores; BENCHMARKS.md, pupil train --ensemble 2 on ELPV "
                           "4-class)")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    out: str = opt("", "run directory (default runs/<model>-<time>)")
    resume: bool = opt(False, "continue the run in --out from its last.pt (same settings, same result)")
    cache_dir: str = opt("", "decode cache (default $PUPIL_CACHE or ~/.cache/pupil)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "images over this many pixels are skipped as too_many_pixels")
    decode_timeout: float = opt(DEFAULT_DECODE_TIMEOUT, "seconds one image may take to decode (in a worker process "
                                "under a memory cap of $PUPIL_DECODE_MEMORY_MB, default 1024); slower files are "
                                "skipped as timeout. 0: decode in-process, no deadline, no cap")
    limit_per_class: int = opt(0, "use at most N training images per class (0: all), for quick trials")
    width: int = opt(32, "small_cnn only: channels of the first stage")
    depth: int = opt(4, "small_cnn only: number of conv-conv-maxpool stages")
    workers: int = opt(2, "processes decoding images into the cache (first run only)")
    progress: bool = opt(True, "progress bars")

    def resolved(self) -> "TrainConfig":
        """Defaults that depend on other fields filled in, and every value checked (ValueError names the flag)."""
        c = copy.copy(self)
        if not c.out:
            c.out = str(Path("runs") / f"{c.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        if isinstance(c.lr, str) and c.lr != "auto":
            c.lr = float(c.lr)
        if not c.lr:
            c.lr = 3e-3 if self.from_scratch else 1e-3
        if not 0.0 <= c.ema < 1.0:
            raise ValueError(f"--ema is a decay in [0, 1), e.g. 0.999, not {c.ema}")
        if not (0.0 < c.eval_crop <= 1.0 or c.eval_crop == 0.0):
            raise ValueError(f"--eval-crop is a fraction in (0, 1] (or 0: the model's own), not {c.eval_crop}")
        if not 0.0 <= c.backbone_lr <= 1.0:
            raise ValueError(f"--backbone-lr is a fraction of --lr in [0, 1], not {c.backbone_lr}")
        if c.freeze_stages < 0:
            raise ValueError(f"--freeze-stages is a number of stages, 0 or more, not {c.freeze_stages}")
        if not 0.0 <= c.lr_decay <= 1.0:
            raise ValueError(f"--lr-decay is a fraction in [0, 1] (0: off), not {c.lr_decay}")
        if c.average_last < 0:
            raise ValueError(f"--average-last is a number of epochs, 0 or more, not {c.average_last}")
        if not c.decode_timeout >= 0:
            raise ValueError(f"--decode-timeout is a number of seconds, 0 or more (0: no deadline), not {c.decode_timeout}")
        if c.cached_views < 0 or not c.view_cache_gb > 0 or not c.decode_cache_gb > 0:
            raise ValueError("--cached-views is a number of views, 0 or more; --view-cache-gb and --decode-cache-gb "
                             "positive sizes")
        if not 0.0 < c.crop_scale <= 1.0:
            raise ValueError(f"--crop-scale is an area fraction in (0, 1], not {c.crop_scale}")
        if not 1 <= c.ensemble <= MAX_MEMBERS:
            raise ValueError(f"--ensemble is a number of models, 1 to {MAX_MEMBERS}, not {c.ensemble}")
        if c.split_seed < -1:
            raise ValueError(f"--split-seed is a seed, 0 or more (-1: --seed's), not {c.split_seed}")
        if self.from_scratch:
            c.stages = "finetune"
        for f in fields(c):
            choices = f.metadata.get("choices")
            if choices and getattr(c, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                                 f"not {getattr(c, f.name)!r}")
        return c

    @property
    def data_seed(self) -> int:
        """The seed of the train/validation split (and of --limit-per-class's choice)."""
        return self.seed if self.split_seed < 0 else self.split_seed

    @property
    def from_scratch(self) -> bool:
        return self.model == "small_cnn" or self.pretrained == "none"

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The settings a config.yaml gives (checked against the fields), as a dict."""
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a mapping of settings")
        raw.pop("asked", None)  # what was asked before a run's choices: a record, the settings above it ran
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return raw

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls(**with_preset(cls.read_file(path)))

    def save(self, path: Path, asked: "TrainConfig | None" = None) -> None:
        """config.yaml: every setting as it ran (each "auto" as what it chose: batch size, lr, flips, balance, input
        size), so `pupil train --config` on it repeats the run rather than deciding again; under `asked`, the value
        given for each setting that a choice replaced (read back, it is shown, not used)."""
        import yaml

        ran = {k: v for k, v in asdict(self).items() if k != "resume"}
        if asked is not None:
            was = {k: v for k, v in asdict(asked).items() if k in ran and ran[k] != v and k != "out"}
            if was:
                ran["asked"] = was
        path.write_text(yaml.safe_dump(ran, sort_keys=False))
