"""training/metrics.py: numbers checked by hand and against scikit-learn, calibration, the abstention threshold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import (choose_threshold, classification_metrics, evaluate_logits, expected_calibration_error,
                              fit_temperature)


def test_metrics_match_hand_computed_values():
    # 3 classes, 6 images. Predictions: a a b | b b c  for truths a a a | b c c
    probs = np.array([[.9, .05, .05], [.6, .3, .1], [.2, .7, .1], [.1, .8, .1], [.2, .5, .3], [.1, .2, .7]])
    labels = np.array([0, 0, 0, 1, 2, 2])
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall a 2/3, b 1/1, c 1/2 -> balanced 13/18; precision a 2/2, b 1/3, c 1/1
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * (1 / 3) * 1 / (1 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["weighted_f1"] == pytest.approx((3 * f1[0] + f1[1] + 2 * f1[2]) / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": pytest.approx(0.5), "support": 1}
    assert m["nll"] == pytest.approx(-np.mean(np.log([.9, .6, .2, .8, .3, .7])))
    conf, correct = probs.max(1), (probs.argmax(1) == labels)
    edges = np.linspace(0, 1, 16)
    ece = sum(abs(correct[(conf > lo) & (conf <= hi)].mean() - conf[(conf > lo) & (conf <= hi)].mean())
              * ((conf > lo) & (conf <= hi)).mean() for lo, hi in zip(edges[:-1], edges[1:]) if ((conf > lo) & (conf <= hi)).any())
    assert expected_calibration_error(probs, labels) == pytest.approx(ece)


def test_metrics_agree_with_scikit_learn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[rng.integers(0, 4, 200)] * 1.5
    labels = rng.integers(0, 4, 200)
    probs = torch.softmax(torch.tensor(logits), -1).numpy()
    m = classification_metrics(probs, labels, list("abcd"))
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(labels, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(sk.f1_score(labels, pred, average="weighted"))
    assert m["nll"] == pytest.approx(sk.log_loss(labels, probs), rel=1e-6)
    assert m["confusion_matrix"] == sk.confusion_matrix(labels, pred).tolist()
    full = evaluate_logits(torch.tensor(logits), torch.tensor(labels), list("abcd"), 1.0)
    assert full["top_k_accuracy"]["top3"] == pytest.approx(sk.top_k_accuracy_score(labels, probs, k=3))


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(1)
    labels = torch.tensor(rng.integers(0, 3, 500))
    logits = torch.tensor(rng.normal(size=(500, 3))) + 1.2 * torch.nn.functional.one_hot(labels, 3)
    overconfident = logits * 6  # right about 60% of the time, sure about it nearly always
    nll = lambda lg: float(torch.nn.functional.cross_entropy(lg.float(), labels))  # noqa: E731
    t = fit_temperature(overconfident, labels)
    assert t > 2
    assert nll(overconfident / t) < nll(overconfident) * 0.6
    before = evaluate_logits(overconfident, labels, list("abc"), 1.0)
    after = evaluate_logits(overconfident, labels, list("abc"), t)
    assert after["ece"] < before["ece"] / 2 and after["accuracy"] == before["accuracy"]


def test_threshold_is_the_lowest_that_meets_the_precision_target():
    # confidences 0.99..0.5; the two least confident are wrong
    probs = np.array([[p, 1 - p] for p in (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5)])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    t = choose_threshold(probs, labels, 0.95)
    assert t["threshold"] == pytest.approx(0.6) and t["coverage"] == 0.75 and t["precision"] == 1.0 and t["met"]
    t = choose_threshold(probs, labels, 0.7)
    assert t["threshold"] == pytest.approx(0.5) and t["coverage"] == 1.0
    bad = choose_threshold(probs, 1 - labels, 0.95)
    assert bad["met"] is False and bad["threshold"] is not None


def test_threshold_never_reports_a_precision_that_tied_scores_break():
    """Six answers at 0.9 (three wrong) below five right ones at 0.95: a cut inside the tie is impossible, since a
    threshold of 0.9 accepts all six. The threshold must stop above the tie, and what it reports must hold."""
    conf = [0.99, 0.98, 0.97, 0.96, 0.95] + [0.9] * 6
    probs = np.array([[c, 1 - c] for c in conf])
    labels = np.array([0] * 5 + [0, 0, 0, 1, 1, 1])
    t = choose_threshold(probs, labels, 0.8)
    accepted = probs.max(1) >= t["threshold"]
    real = float((probs.argmax(1) == labels)[accepted].mean())
    assert t["precision"] == pytest.approx(real) and real >= 0.8 and t["met"]
    assert t["threshold"] == pytest.approx(0.95) and t["coverage"] == pytest.approx(5 / 11)
    # for a target the tie can reach (8 of 11 right), the threshold takes the whole tie
    t = choose_threshold(probs, labels, 0.7)
    assert t["threshold"] == pytest.approx(0.9) and t["coverage"] == 1.0 and t["precision"] == pytest.approx(8 / 11)


def test_logit_adjustment_moves_decisions_to_the_rare_class_only_when_it_pays():
    from training.metrics import choose_logit_bias

    rng = np.random.default_rng(0)
    train_labels = np.array([0] * 900 + [1] * 100)  # 9:1
    y = np.array([0] * 180 + [1] * 20)
    # a model that separates the classes but has learnt the 9:1 prior: the rare class's logit sits just under the
    # frequent one's for rare images (-0.5), far under it for the others (-3)
    rare = np.where(y == 1, rng.normal(-0.5, 0.3, 200), rng.normal(-3.0, 0.3, 200))
    logits = torch.tensor(np.stack([np.zeros(200), rare], 1), dtype=torch.float32)
    bias, record = choose_logit_bias(logits, torch.tensor(y), train_labels, 2)
    assert record["tau"] > 0 and record["val_macro_f1"][record["tau"]] > record["val_macro_f1"][0.0]
    assert bias[1] > bias[0]  # the rare class gains
    torch.testing.assert_close(bias, -record["tau"] * torch.log(torch.tensor([0.9, 0.1])))
    # every tau's three figures are recorded: at tau 0 the model's own answers (what --balance none would score)
    from training.metrics import classification_metrics

    for tau in (0.0, record["tau"]):
        probs = torch.softmax(logits - tau * torch.log(torch.tensor([0.9, 0.1])), -1).numpy()
        m = classification_metrics(probs, y, ["0", "1"])
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert record[f"val_{name}"][tau] == pytest.approx(m[name])
    assert record["val_balanced_accuracy"][record["tau"]] > record["val_balanced_accuracy"][0.0]
    # a model that is already right: nothing to gain, tau stays 0
    perfect = torch.tensor(np.stack([5.0 * (y == 0), 5.0 * (y == 1)], 1), dtype=torch.float32)
    assert choose_logit_bias(perfect, torch.tensor(y), train_labels, 2)[1]["tau"] == 0.0


def test_wilson_interval_matches_the_textbook_values_and_stays_inside_0_1():
    from training.metrics import wilson_interval

    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)  # Wilson 1927 / Newcombe 1998
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_paired_difference_of_two_models_on_the_same_images():
    import numpy as np

    from training.metrics import paired_difference, per_image_scores

    y = np.array([0, 0, 0, 1])
    a, b = per_image_scores(np.array([0, 0, 0, 1]), y, 2, False), per_image_scores(np.array([0, 1, 0, 0]), y, 2, False)
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(0.5) and se == pytest.approx(np.std([0, .25, 0, .25], ddof=1) * 2)
    bal = per_image_scores(np.array([0, 0, 0, 1]), y, 2, True)
    assert bal.sum() == pytest.approx(1.0) and bal[3] == pytest.approx(0.5)  # the lone class-1 image is half the score
