"""Peak resident memory of `pupil train` (and what sets it), so a user knows what a machine or container must have.

Each configuration is a fresh `pupil train` process (the allocator settings as the CLI sets them) on the ELPV demo
folder, limited to 200 training images per class and 2 epochs (the peak is reached in the first steps: later epochs
reuse the same memory); the figure is the process's own peak (ru_maxrss, in metrics.json). 3 repeats each.

    python -m bench.memory
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import header, row

CONFIGS = {
    "efficientnet_lite0 224 px, batch 32 (defaults)": [],
    "efficientnet_lite0 224 px, batch 16": ["--batch-size", "16"],
    "efficientnet_lite0 224 px, batch 8": ["--batch-size", "8"],
    "efficientnet_lite0 160 px, batch 32 (the demo)": ["--img-size", "160"],
    "small_cnn 128 px, batch 32": ["--model", "small_cnn"],
}


def main() -> None:
    from pupil.demo import materialise_elpv

    data = materialise_elpv()
    header("peak resident memory of pupil train")
    for name, extra in CONFIGS.items():
        peaks = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as out:
                r = subprocess.run([sys.executable, "-m", "pupil", "train", str(data), "--limit-per-class", "200",
                                    "--epochs", "2", "--device", "cpu", "--no-progress", "--out", out, *extra],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(r.stderr[-2000:])
                peaks.append(json.loads((Path(out) / "metrics.json").read_text())["peak_rss_mb"])
        print(row(name, peaks, "MB", 48), flush=True)


if __name__ == "__main__":
    main()
