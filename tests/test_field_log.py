"""service/field_log.py: what is logged, the image cap, and a request log that never grows past twice its cap."""
from __future__ import annotations

import json

from service.field_log import FieldLog
from tests.corpus import photo


def _answer(score: float, abstained: bool = False) -> dict:
    return {"predictions": [{"label": "cat", "score": score}], "abstained": abstained}


def test_logs_abstained_and_low_scores_only(tmp_path):
    log = FieldLog(tmp_path, images=False, below=0.6, max_mb=1)
    log.record(b"a", "sure.png", _answer(0.9))
    log.record(b"b", "unsure.png", _answer(0.5))
    log.record(b"c", "abstained.png", _answer(0.95, abstained=True))
    names = [json.loads(x)["filename"] for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert names == ["unsure.png", "abstained.png"]


def test_images_stop_at_the_cap_and_the_log_rotates(tmp_path):
    import io

    buf = io.BytesIO()
    photo(200, 150).save(buf, format="PNG")
    png = buf.getvalue()
    log = FieldLog(tmp_path, images=True, below=1.1, max_mb=3.5 * len(png) / 2**20, rotate_mb=0.002)  # 2 kB log
    for i in range(40):
        log.record(png + bytes([i]), f"{i}.png", _answer(0.5))  # 40 different files
    assert len(list((tmp_path / "images" / "cat").iterdir())) == 3  # the image cap
    current, previous = tmp_path / "requests.jsonl", tmp_path / "requests.jsonl.1"
    assert current.stat().st_size <= 2048 and previous.stat().st_size <= 2048  # rotated, never above twice the cap
    last = json.loads(current.read_text().splitlines()[-1])
    assert last["filename"] == "39.png" and last["image"] is None  # still logged after the image cap
