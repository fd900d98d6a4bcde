"""Data as scientists keep it (issue 16): zarr v2 and v3 stores, CSV and zarr through
xarray and pandas, read from a real share through fsspec (`kbfs://`, `sha1://`).

One real relay and share (tests/netutil.py) serve a folder holding a zarr v2 store
(`.zgroup`, `.zattrs`, `.zarray`: dotfiles the share serves by default), a zarr v3 store
(`zarr.json`) and a CSV. zarr probes for metadata that is not there (a v3 open asks for
`.zarray`, a v2 one for `zarr.json`), which must come back as FileNotFoundError.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
from netutil import RelayProc, ShareProc, start_relay, start_share

zarr = pytest.importorskip("zarr")  # in setup.cfg's test extra: present in `make test`
xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


@dataclass
class Store:
    relay: RelayProc
    share: ShareProc
    data_dir: Path
    v2: np.ndarray
    v3: np.ndarray
    csv: bytes

    @property
    def top(self) -> str:
        return f"kbfs://{self.relay.url.split('://', 1)[1]}/{self.share.id}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("zarr")
    data_dir = tmp / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(7)
    v2 = rng.standard_normal((64, 50)).astype("f4")
    v3 = rng.integers(0, 1000, size=(40, 30), dtype="i4")
    g2 = zarr.open_group(str(data_dir / "v2.zarr"), mode="w", zarr_format=2)
    g2.attrs["session"] = "day1"
    a2 = g2.create_array("traces", shape=v2.shape, chunks=(16, 25), dtype="f4")
    a2[:] = v2
    g3 = zarr.open_group(str(data_dir / "v3.zarr"), mode="w", zarr_format=3)
    a3 = g3.create_array("spikes", shape=v3.shape, chunks=(10, 10), dtype="i4")
    a3[:] = v3
    ds = xr.Dataset({"rate": (("unit", "t"), v2[:8, :20].astype("f8"))},
                    coords={"unit": np.arange(8), "t": np.arange(20) * 0.5})
    ds.to_zarr(str(data_dir / "ds.zarr"), zarr_format=2, consolidated=False)
    csv = b"unit,quality\n" + b"".join(b"%d,%s\n" % (i, b"good" if i % 4 else b"mua")
                                       for i in range(100))
    (data_dir / "units.csv").write_bytes(csv)
    assert (data_dir / "v2.zarr" / "traces" / ".zarray").exists()
    relay = start_relay(tmp)
    try:
        share = start_share(data_dir, relay.url, tmp)
    except BaseException:
        relay.stop()
        raise
    try:
        yield Store(relay, share, data_dir, v2, v3, csv)
    finally:
        share.stop()
        relay.stop()


@pytest.fixture
def opts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return {"cache_dir": str(tmp_path / "cache"), "local": False}


def test_probes_for_missing_metadata_are_file_not_found(store: Store,
                                                        opts: dict[str, object]) -> None:
    """Was: BadRequest for a dot name (`.zarray`), which broke zarr's probing."""
    fs = fsspec.filesystem("kbfs", **opts)
    top = store.top
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{top}/v3.zarr/.zarray")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{top}/v2.zarr/zarr.json")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{top}/v2.zarr/.zmetadata").read()
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{top}/v2.zarr/../units.csv")
    assert not fs.exists(f"{top}/v3.zarr/spikes/.zattrs")
    assert fs.exists(f"{top}/v2.zarr/traces/.zarray")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{top}/v2.zarr")
    sfs = fsspec.filesystem("sha1", relays=[store.relay.url], **opts)
    with pytest.raises(FileNotFoundError):
        sfs.info("not-a-sha1/.zarray")


def test_zarr_v2_through_kbfs(store: Store, opts: dict[str, object]) -> None:
    g = zarr.open_group(f"{store.top}/v2.zarr", mode="r", storage_options=opts)
    assert g.attrs["session"] == "day1"
    np.testing.assert_array_equal(g["traces"][:], store.v2)
    np.testing.assert_array_equal(g["traces"][10:20, 5:7], store.v2[10:20, 5:7])


def test_zarr_v3_through_kbfs(store: Store, opts: dict[str, object]) -> None:
    g = zarr.open_group(f"{store.top}/v3.zarr", mode="r", storage_options=opts)
    np.testing.assert_array_equal(g["spikes"][:], store.v3)
    a = zarr.open_array(f"{store.top}/v3.zarr/spikes", mode="r", storage_options=opts)
    assert a.shape == store.v3.shape and a[3, 4] == store.v3[3, 4]


def test_xarray_open_zarr_and_pandas(store: Store, opts: dict[str, object]) -> None:
    ds = xr.open_zarr(f"{store.top}/ds.zarr", consolidated=False, storage_options=opts)
    np.testing.assert_allclose(ds["rate"].values, store.v2[:8, :20])
    assert list(ds["t"].values[:3]) == [0.0, 0.5, 1.0]
    df = pd.read_csv(f"{store.top}/units.csv", storage_options=opts)
    assert len(df) == 100 and (df["quality"] == "mua").sum() == 25
    sha1 = hashlib.sha1(store.csv).hexdigest()
    df2 = pd.read_csv(f"sha1://{sha1}/units.csv",
                      storage_options={"relays": [store.relay.url], **opts})
    assert df2.equals(df)
    assert os.path.basename(f"sha1://{sha1}/units.csv") == "units.csv"
