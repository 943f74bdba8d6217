"""training/augment.py: crops and flips on whole batches, mixup/cutmix, policies that leave the global RNGs alone."""
from __future__ import annotations

import torch

from training.augment import augment_policy, beta, make_policy, mix_batch, random_resized_crop_flip


def _grid(n: int = 64, size: int = 16) -> torch.Tensor:
    """n copies of one asymmetric picture (a gradient plus a corner mark), NCHW float."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([x.float(), y.float(), (x * y).float()])
    img[:, :3, :3] = 255.0
    return img.expand(n, -1, -1, -1).clone()


def test_mixup_cutmix_and_their_beta_draws():
    g = torch.Generator().manual_seed(0)
    draws = [beta(0.4, g) for _ in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55 and min(draws) < 0.05 and max(draws) > 0.95  # U-shaped, mean 1/2
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    mx, y2, lam = mix_batch(x, y, 0.0, 1.0, g)
    changed = (mx != x).any(1).float().mean().item()
    assert abs((1 - lam) - changed) < 0.15 and (y2 != y).any()  # the pasted area matches the label weight
    mx, y2, lam = mix_batch(x, y, 0.4, 0.0, g)
    torch.testing.assert_close(mx, x * lam + x[[list(y).index(v) for v in y2]] * (1 - lam))


def test_full_scale_without_flips_is_the_evaluation_centre_crop():
    x = torch.rand(4, 3, 20, 20) * 255
    out = random_resized_crop_flip(x, 16, scale=(1.0, 1.0), flips="none", generator=torch.Generator())
    torch.testing.assert_close(out, x[:, :, 2:18, 2:18])


def test_flip_modes_reach_exactly_their_symmetries():
    x = _grid()
    variants = {
        "h": {"id", "h"},
        "hv": {"id", "h", "v", "hv"},
        "d8": {"id", "h", "v", "hv", "t", "th", "tv", "thv"},
    }
    ops = {"id": lambda a: a, "h": lambda a: a.flip(-1), "v": lambda a: a.flip(-2), "hv": lambda a: a.flip(-1, -2),
           "t": lambda a: a.transpose(-1, -2)}
    for k in ("th", "tv", "thv"):
        ops[k] = (lambda rest: lambda a: ops[rest](a.transpose(-1, -2)))(k[1:])
    for mode, expected in variants.items():
        # full scale and a square aspect: only the flips vary
        out = random_resized_crop_flip(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flips=mode,
                                       generator=torch.Generator().manual_seed(1))
        seen = set()
        for img in out:
            match = [name for name, f in ops.items() if torch.allclose(img, f(x[0]), atol=1e-3)]
            assert len(match) == 1, mode
            seen.add(match[0])
        assert seen == expected, (mode, seen)


def test_policy_is_reproducible_and_leaves_the_global_rng_alone():
    policy = make_policy("trivial")
    x = (torch.rand(6, 3, 24, 24) * 255).to(torch.uint8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = augment_policy(x, policy, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    b = augment_policy(x, policy, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)
