"""Keep every data test offline and away from the user's folders.

The user cache goes to a temporary folder, ``$CREDITFLOW_DATA`` and the system folders are
cleared, and opening a URL fails unless a test installs its own fetcher.
"""

import pytest

from creditflow.data import sources


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDITFLOW_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.delenv("CREDITFLOW_DATA", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [])

    def offline(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(sources, "urlopen", offline)
