"""`worker/model_cache.py`: a model counts as cached only once its folder carries the `.complete` marker (an
interrupted download is never mistaken for a model), and `ensure` reuses a complete folder as it is. (Building
the tiny model is the demo's first step; downloading a real one cannot run here.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.model_cache import MARKER, ModelCache


def test_only_complete_folders_count_as_cached(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    half = cache.path("tunegrid/tiny-llama")
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert cache.cached() == []
    (half / MARKER).write_text("tunegrid/tiny-llama")
    assert cache.cached() == ["tunegrid/tiny-llama"]
    assert cache.ensure("tunegrid/tiny-llama") == half  # reused as it is: nothing built or fetched


def test_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="gpt-9"):
        ModelCache(tmp_path).ensure("gpt-9")
