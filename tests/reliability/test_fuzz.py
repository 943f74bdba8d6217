"""The decoder under a seeded mutation fuzzer (bench/fuzz.py): every file, mutated or hostile, is a decoded square
or one of our problem codes; never another exception. The named cases are each hostile file a fuzzer ever found,
kept so that `make test` keeps them fixed; the memory they once cost is measured by `python -m bench.fuzz`."""
from __future__ import annotations

import pytest

from bench.fuzz import NAMED, cases, outcome
from models.images import PROBLEM_STATUS

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]


@pytest.mark.parametrize("name", sorted(NAMED))
def test_each_hostile_file_found_so_far_is_answered(name):
    result, _ = outcome(NAMED[name]())
    assert result == "ok" or result in PROBLEM_STATUS, (name, result)
    if name in ("jpeg-scan-flood", "ico-65535-png"):
        assert result != "ok"  # refused before the decode, not after minutes or gigabytes


def test_hostile_sizes_are_refused_from_the_header_with_the_right_code():
    assert outcome(NAMED["ico-65535-png"]())[0] == "too_many_pixels"
    assert outcome(NAMED["jpeg-scan-flood"]())[0] == "corrupt"
    assert outcome(NAMED["tiff-60000-ifds"]())[0] == "ok"  # the first page, without walking the other 59,999


def test_a_few_hundred_mutated_files_each_end_in_an_image_or_a_problem_code():
    results = {}
    for fmt, mut, data in cases(400, seed=1234):
        result, _ = outcome(data)
        assert not result.startswith("crash"), (fmt, mut, result, data[:64])
        results[result] = results.get(result, 0) + 1
    assert results.get("ok", 0) > 40 and sum(v for k, v in results.items() if k != "ok") > 40, results


def test_the_service_answers_hostile_and_mutated_files_with_4xx_and_batches_keep_their_contract(server):
    """Every named hostile file and a hundred mutated ones through /classify (a 4xx JSON error or 200), and mixed into
    /classify_batch with a good image: 200 for the batch, the good one answered, each bad one its own error entry."""
    import httpx

    import random

    from bench.fuzz import seeds

    good = seeds(random.Random(0))["png-rgb"]
    files = [(name, make()) for name, make in NAMED.items()] + [(f"{f}-{m}", d) for f, m, d in cases(100, seed=99)]
    with httpx.Client(timeout=120) as c:
        for name, data in files:
            r = c.post(f"{server.url}/classify", files={"image": (name, data, "application/octet-stream")})
            assert r.status_code < 500, (name, r.status_code, r.text[:200])
            if r.status_code != 200:
                assert r.json()["error"] in PROBLEM_STATUS, (name, r.text[:200])
        for i in range(0, len(files), 8):
            chunk = files[i:i + 8]
            parts = [("images", ("good.png", good, "image/png"))] + [("images", (n, d, "application/octet-stream"))
                                                                     for n, d in chunk]
            r = c.post(f"{server.url}/classify_batch", files=parts)
            assert r.status_code == 200, ([n for n, _ in chunk], r.status_code, r.text[:300])
            entries = r.json()
            assert len(entries) == len(chunk) + 1 and "predictions" in entries[0]
            assert all("predictions" in e or e["error"] in PROBLEM_STATUS for e in entries[1:]), entries
    assert server.alive()
