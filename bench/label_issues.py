"""How well pupil finds wrong labels: 5 % of a real set's training and validation labels flipped at random (3 seeds),
then pupil's finder (training/label_issues.py: 5-fold out-of-fold probes on the cached features, confident learning)
and, where cleanlab installs, cleanlab's `find_label_issues` on the SAME out-of-fold probabilities (its defaults:
filter_by="prune_by_noise_rate", ranked by self-confidence). Precision and recall of the first N and 2N of each
ranking, N = the number flipped; a flipped image counts as found, an original one as a false alarm (on ELPV some
original labels are wrong too, so precision there is a lower bound).

Beside it, what dropping the flagged training images does to a linear probe trained on the flipped labels, on the
task's untouched test split (a probe-only stand-in for a default run with and without --drop-label-issues: a full
fine-tune per cell did not fit this session's CPU time).

    python -m bench.label_issues [--tasks digits,elpv-binary,colours] [--seeds 0,1,2] [--rate 0.05]

(colours: bench.digits' easy two-colour set; --rate 0: nothing flipped, what is flagged is all false alarms)
"""
from __future__ import annotations

import statistics
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from bench.quality import task_folder
from models.runtime import OneLineParser


def features(task: str):
    from training.config import TrainConfig
    from training.prepare import start
    from training.probe import probe_features

    cfg = TrainConfig(data=str(task_folder(task)), stages="probe", progress=False, out=tempfile.mkdtemp())
    setup, prep = start(cfg)
    xt, yt, xv, yv = probe_features(prep.model, prep.train, prep.val, setup)
    xs, ys = probe_features(prep.model, prep.test, prep.test, setup)[:2]
    return torch.cat([xt, xv]), torch.cat([yt, yv]), len(yt), xs, ys, len(prep.classes)


def precision_recall(ranked: np.ndarray, flipped: set[int], n: int) -> tuple[float, float]:
    top = set(ranked[:n].tolist())
    hit = len(top & flipped)
    return hit / max(1, len(top)), hit / max(1, len(flipped))


def probe_test_accuracy(x, y, xs, ys, k: int, keep: np.ndarray) -> float:
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], k)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    xt, yt = ((x - mean) / std)[torch.from_numpy(keep)], y[torch.from_numpy(keep)]
    for _ in range(100):
        loss = F.cross_entropy(head(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head((xs - mean) / std).argmax(1) == ys).float().mean())


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,elpv-binary")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rate", type=float, default=0.05)
    args = ap.parse_args()
    from bench.common import header
    from training.label_issues import confident_learning, out_of_fold_probabilities

    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
    except ImportError:
        cleanlab_find = None
    header(f"label issues: {args.rate:.0%} of the labels flipped, found again")
    print("| task | finder | P@N | R@N | P@2N | R@2N | flagged | probe test acc: all / flagged train dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for task in args.tasks.split(","):
        x, y, n_train, xs, ys, k = features(task)
        rows: dict[str, list[tuple]] = {"pupil": [], "cleanlab": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            rng = np.random.default_rng(seed)
            n = int(round(args.rate * len(y)))
            idx = rng.choice(len(y), n, replace=False)
            noisy = y.clone()
            noisy[torch.from_numpy(idx)] = torch.from_numpy(
                (y[torch.from_numpy(idx)].numpy() + rng.integers(1, k, n)) % k)
            flipped = set(idx.tolist())
            probs = out_of_fold_probabilities(x, noisy, k, 5, seed)
            ours = confident_learning(probs, noisy.numpy())[0]
            rankings = {"pupil": ours}
            if cleanlab_find is not None:
                rankings["cleanlab"] = cleanlab_find(noisy.numpy(), probs, return_indices_ranked_by="self_confidence")
            for name, ranked in rankings.items():
                # rank positions past the flagged set are filled by self-confidence, so @2N is always defined
                rest = np.argsort(probs[np.arange(len(noisy)), noisy.numpy()], kind="stable")
                full = np.concatenate([ranked, [i for i in rest if i not in set(ranked.tolist())]])
                p1, r1 = precision_recall(full, flipped, n)
                p2, r2 = precision_recall(full, flipped, 2 * n)
                keep_all = np.arange(n_train)
                gone = set(ranked.tolist())
                keep = np.array([i for i in keep_all if i not in gone], dtype=np.int64)
                acc_all = probe_test_accuracy(x[:n_train], noisy[:n_train], xs, ys, k, keep_all)
                acc_drop = probe_test_accuracy(x[:n_train], noisy[:n_train], xs, ys, k, keep)
                rows[name].append((p1, r1, p2, r2, len(ranked), acc_all, acc_drop))
        for name, rs in rows.items():
            if not rs:
                continue

            def ms(j: int, rs=rs) -> str:
                if j < 4 and args.rate == 0:
                    return "n/a"  # nothing flipped: only the number flagged means anything
                v = [r[j] for r in rs]
                return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"

            print(f"| {task} ({len(y)} images, {len(rs)} seeds) | {name} | {ms(0)} | {ms(1)} | {ms(2)} | {ms(3)} | "
                  f"{statistics.mean(r[4] for r in rs):.0f} | {ms(5)} / {ms(6)} |", flush=True)


if __name__ == "__main__":
    main()
