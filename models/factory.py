"""One front door: `create_model(arch, num_classes, pretrained)` for any timm architecture and for `small_cnn`."""
from __future__ import annotations

from typing import Any

from torch import nn

from .pretrained import PretrainedError, bundled_weights_file, load_pretrained, timm_arch
from .small_cnn import SmallCNN
from .spec import ModelSpec

SMALL_CNN = "small_cnn"


def gray_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float], tuple[float]]:
    """One channel's normalisation for a model whose pretrained stem filters were summed over RGB."""
    return (sum(mean) / len(mean),), (sum(std) / len(std),)


def create_model(
    arch: str,
    num_classes: int,
    pretrained: str = "auto",
    *,
    img_size: int | None = None,
    keep_head: bool = False,
    **model_args: Any,
) -> tuple[nn.Module, ModelSpec]:
    """Build `arch` with a head for `num_classes`; return the model and its ModelSpec.

    keep_head: load the pretrained classifier too (only meaningful with num_classes equal to the checkpoint's).
    model_args may hold in_chans=1 for grayscale data: the pretrained stem's RGB filters are summed (timm's
    adapt_input_conv), which on a gray image computes exactly what the RGB model computes on its replication.
    """
    if model_args.get("in_chans", 3) not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, not {model_args['in_chans']}")
    if model_args.get("in_chans") == 3:
        model_args.pop("in_chans")
    if arch == SMALL_CNN:
        if pretrained not in ("none", "auto"):
            model = SmallCNN(num_classes=num_classes, **model_args)
            from .pretrained import read_state_dict

            model.load_state_dict(read_state_dict(pretrained))
            source = f"local weights file {pretrained}"
        else:
            model, source = SmallCNN(num_classes=num_classes, **model_args), "none (trained from scratch)"
        size = img_size or 128
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        if model_args.get("in_chans") == 1:
            mean, std = gray_stats(mean, std)
        spec = ModelSpec(SMALL_CNN, num_classes, size, mean, std, "bilinear", 0.875, dict(model.model_args), source)
        return model, spec

    import timm

    name = timm_arch(arch, pretrained)
    if not timm.is_model(name):
        raise PretrainedError(f"unknown architecture {arch!r}: not small_cnn and not a timm model name")
    if pretrained == "hub" or (pretrained == "auto" and bundled_weights_file(arch) is None):
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_args)
        except Exception as e:
            raise PretrainedError(
                f"could not download pretrained weights for {name} from the hub ({type(e).__name__}); "
                "offline? use --pretrained PATH with a local .safetensors/.pth, or --pretrained none"
            ) from None
        source = f"timm hub ({name})"
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
        source = "none (random init)" if pretrained == "none" else load_pretrained(model, name, pretrained, keep_head=keep_head)
    if not keep_head:
        reset_head(model)
    cfg = model.pretrained_cfg
    size = img_size or cfg["input_size"][-1]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if model_args.get("in_chans") == 1:
        mean, std = gray_stats(mean, std)
    spec = ModelSpec(
        name, num_classes, size, mean, std, cfg.get("interpolation", "bicubic"),
        float(cfg.get("crop_pct", 0.875)), dict(model_args), source,
    )
    return model, spec


def reset_head(model: nn.Module) -> None:
    """A small, zero-mean head. timm's EfficientNet init scales the classifier by 1/sqrt(num_classes): with 2
    classes and 1280 pretrained features that starts the logits around +-15 and the loss near 4 (seen on ELPV)."""
    clf = model.get_classifier()
    if isinstance(clf, nn.Linear):
        nn.init.normal_(clf.weight, std=0.01)
        nn.init.zeros_(clf.bias)


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """An uninitialised model of the spec's architecture (weights come from the artifact); an ensemble's members
    averaged (models.ensemble.Averaged) where the spec has more than one."""
    if spec.members > 1:
        from dataclasses import replace

        from .ensemble import Averaged

        return Averaged([build_from_spec(replace(spec, members=1)) for _ in range(spec.members)])
    if spec.architecture == SMALL_CNN:
        return SmallCNN(num_classes=spec.num_classes, **spec.model_args)
    import timm

    return timm.create_model(spec.architecture, pretrained=False, num_classes=spec.num_classes, **spec.model_args)
