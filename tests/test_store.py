"""service/store.py: an artifact enters BentoML's store under a tag that changes with anything that changes an
answer, so a changed threshold is never served under the old tag."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import bentoml

from models.artifact import update_config
from service.store import import_artifact, resolve


def test_tag_follows_the_answers_not_just_the_weights(trained_run, tmp_path):
    art = tmp_path / "model"
    shutil.copytree(trained_run / "model", art)
    first = import_artifact(art)
    assert import_artifact(art) == first  # the same artifact twice: one model
    assert resolve(str(tmp_path)) == first  # a run folder resolves to its model/
    update_config(art, threshold=0.42)
    second = import_artifact(art)
    assert second != first
    stored = bentoml.models.get(second)
    assert json.loads(Path(stored.path_of("config.json")).read_text())["threshold"] == 0.42
    assert resolve("pupil") == "pupil:latest" and resolve("pupil:abc") == "pupil:abc"


def test_the_model_name_is_the_settings_one_read_when_imported(trained_run, tmp_path, monkeypatch):
    """PUPIL_MODEL_NAME reaches the store through the service's settings, read when the artifact is imported (it
    was read once when the module was, so a name set later was ignored)."""
    from service.settings import Settings

    monkeypatch.setenv("PUPIL_MODEL_NAME", "defects")
    tag = import_artifact(trained_run / "model")
    assert tag.split(":")[0] == "defects" == Settings.from_env().model_name
    assert bentoml.models.get(tag).tag.name == "defects"
