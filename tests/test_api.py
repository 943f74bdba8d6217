"""The Python API, run as README's notebook example shows it."""
from __future__ import annotations

import httpx


def test_the_notebook_example(shapes_dir, tmp_path):
    import pupil

    run = pupil.train(shapes_dir, model="small_cnn", width=8, img_size=32, epochs=6, batch_size=8,
                      out=str(tmp_path / "mine"), progress=False, workers=1)
    assert run.metrics["val"]["accuracy"] >= 0.8 and run.report.is_file()
    model = pupil.load(run)
    answers = model.predict([shapes_dir / "red" / "red_003.png", shapes_dir / "blue" / "blue_003.png"])
    assert [a["predictions"][0]["label"] for a in answers] == ["red", "blue"]
    heat = model.explain(shapes_dir / "red" / "red_003.png")
    assert heat.label == "red" and heat.png()[:4] == b"\x89PNG"
    result = pupil.evaluate(run, shapes_dir, out=tmp_path / "ev")
    assert result["metrics"]["n"] == 48 and (tmp_path / "ev" / "report.html").is_file()
    assert pupil.Run.open(run.path).metrics["model"] == "small_cnn"
    with pupil.serve(run) as server:
        r = httpx.post(f"{server.url}/classify",
                       files={"image": ("x.png", (shapes_dir / "blue" / "blue_004.png").read_bytes())})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "blue"
    assert not server.alive()
