"""Batches: the images of a split as rows of the uint8 decode cache (training.cache), served augmented-ready,
on the GPU as one resident tensor where it fits. The manifest they come from is training/manifest.py.

    Manifest (training.manifest) --decode once--> DecodeCache (memmap) --> ImageSet --> batches (augmented on device)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from .cache import DecodeCache
from .manifest import FileRecord


def apply_cache_failures(records: Sequence[FileRecord], cache: DecodeCache) -> None:
    """Files that failed to decode become problems in the manifest (and are thereby excluded)."""
    for r in records:
        if r.problem is None and r.sha256 in cache.failed:
            r.problem, r.detail = cache.failed[r.sha256]


@dataclass
class ImageSet:
    """Rows of the cache and their labels, for one split."""

    cache: DecodeCache
    rows: np.ndarray
    labels: np.ndarray
    paths: list[str] = field(default_factory=list)
    resident: "torch.Tensor | None" = None  # the images as one uint8 tensor on the GPU (see to_device)
    resident_labels: "torch.Tensor | None" = None

    @classmethod
    def from_records(cls, cache: DecodeCache, records: Sequence[FileRecord], classes: list[str]) -> "ImageSet":
        cid = {c: i for i, c in enumerate(classes)}
        keep = [r for r in records if r.problem is None and r.sha256 in cache.index]
        return cls(cache, np.array([cache.index[r.sha256] for r in keep], dtype=np.int64),
                   np.array([cid[r.label] for r in keep], dtype=np.int64), [r.path for r in keep])

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> "ImageSet":
        """The images at the indices `keep`, in order (on the GPU too, where the set is resident)."""
        out = ImageSet(self.cache, self.rows[keep], self.labels[keep], [self.paths[i] for i in keep])
        if self.resident is not None:
            import torch

            k = torch.as_tensor(keep, device=self.resident.device)
            out.resident, out.resident_labels = self.resident[k], self.resident_labels[k]
        return out

    def crop(self, i: int, size: int) -> np.ndarray:
        """Image i's centre crop at the model's input size (uint8 HxWx3), as the Predictor would feed it."""
        from models.preprocess import center

        return np.ascontiguousarray(center(self.cache.images[self.rows[i]], size))

    def to_device(self, device) -> bool:
        """Keep the set's images on the GPU as one uint8 tensor (airbench's way: no copy per batch, no loader) when
        it takes under a quarter of the free GPU memory; ELPV's 2,624 images at 256 px are 0.5 GB. Returns whether
        it did."""
        import torch

        need = len(self.rows) * int(np.prod(self.cache.images.shape[1:]))
        if device.type != "cuda" or not len(self.rows) or need > torch.cuda.mem_get_info(device)[0] // 4:
            return False
        x = np.empty((len(self.rows),) + self.cache.images.shape[1:], dtype=np.uint8)
        order = np.argsort(self.rows)
        x[order] = self.cache.images[self.rows[order]]
        self.resident = torch.from_numpy(x).to(device)
        self.resident_labels = torch.from_numpy(self.labels).to(device)
        return True

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident is not None:
            i = torch_index(idx, self.resident.device)
            return self.resident[i], self.resident_labels[i]
        rows = self.rows[idx]
        order = np.argsort(rows)  # sorted reads are sequential on the memmap
        x = np.empty((len(rows),) + self.cache.images.shape[1:], dtype=np.uint8)
        x[order] = self.cache.images[rows[order]]
        import torch

        return torch.from_numpy(x), torch.from_numpy(self.labels[idx])


def torch_index(idx: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(idx)).to(device, non_blocking=True)


def iterate(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False, weights: torch.Tensor | None = None) -> Iterator[np.ndarray]:
    import torch  # here, so that `pupil check` (scan, split) runs without importing torch

    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=generator).numpy()
    elif shuffle:
        order = torch.randperm(n, generator=generator).numpy()
    else:
        order = np.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for s in range(0, stop, batch_size):
        yield order[s:s + batch_size]
