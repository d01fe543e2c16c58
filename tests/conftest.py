from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default SmolLM2 bundle: the one `make test` exported, or exported here once."""
    path = Path(os.environ.get("DEFAULT_BUNDLE", REPO / "bundles" / "smollm2-135m"))
    if not path.is_absolute():
        path = REPO / path
    if not (path / "manifest.json").is_file():
        path = tmp_path_factory.mktemp("bundles") / "smollm2-135m"
        result = run_cli("export", "--source", "default", "--out", str(path))
        assert result.returncode == 0, result.stderr
    return path
