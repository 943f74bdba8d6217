"""service/settings.py: the environment read once, with one rule for batching."""
from __future__ import annotations

import pytest

from service.settings import MB, Settings


def test_defaults_and_overrides():
    s = Settings.from_env({})
    assert (s.max_bytes, s.max_request_bytes, s.max_files, s.max_pixels) == (20 * MB, 64 * MB, 64, 50_000_000)
    assert s.batching is False and s.handler_threads >= 1 and s.model_tag == "pupil:latest"
    s = Settings.from_env({"PUPIL_MAX_FILES": "3", "PUPIL_MAX_REQUEST_MB": "0.5", "PUPIL_TTA": "1",
                           "PUPIL_MODEL_TAG": "pupil:abc"})
    assert (s.max_files, s.max_request_bytes, s.tta, s.model_tag) == (3, MB // 2, True, "pupil:abc")


def test_batching_is_decided_by_one_rule():
    assert Settings.from_env({"PUPIL_BATCHING": "on"}).batching is True
    assert Settings.from_env({"PUPIL_BATCHING": "off"}).batching is False
    assert Settings.from_env({"PUPIL_BATCHING": "auto", "PUPIL_DEVICE": "cpu"}).batching is False
    on = Settings.from_env({"PUPIL_BATCHING": "on", "PUPIL_MAX_BATCH": "48"})
    assert on.handler_threads >= 48  # enough handlers for a full batch to queue up
    with pytest.raises(ValueError, match="PUPIL_BATCHING"):
        Settings.from_env({"PUPIL_BATCHING": "sometimes"})
    with pytest.raises(ValueError, match="PUPIL_MAX_FILES"):
        Settings.from_env({"PUPIL_MAX_FILES": "many"})
