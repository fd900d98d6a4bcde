"""`kbfs mirror push` into an S3-compatible server on loopback (moto's server mode, from
PyPI: no S3 server installs from Debian), read back by `kbfs mirror verify` and `kbfs cat
--mirror s3://...`, signed (presigned URLs, test credentials) and anonymous (a public-read
bucket, no credentials); a second push skips what is there; multipart for big objects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kbfs import mirrorurl, prv
from tests.lyingmirror import MotoS3
from tests.test_mirror import kbfs

pytest.importorskip("boto3")
pytest.importorskip("moto")


def test_push_verify_and_read(tmp_path: Path) -> None:
    data = os.urandom(20 * (1 << 20) + 777)  # > the 8 MiB part size: a multipart upload
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "big.prv").write_text(prv.create_pointer(tmp_path / "big.bin").to_json())
    p = prv.load_pointer(tmp_path / "big.prv")
    obj = json.loads((tmp_path / "big.prv").read_text())
    obj["original_path"] = "/nonexistent"
    (tmp_path / "remote.prv").write_text(json.dumps(obj))
    with MotoS3(tmp_path) as s3:
        client = s3.client()
        client.create_bucket(Bucket="kbfs-mirror")
        r = kbfs(tmp_path, "mirror", "push", str(tmp_path / "big.prv"), "s3://kbfs-mirror/lab",
                 "--endpoint-url", s3.url, env={k: v for k, v in s3.env.items()
                                                if k != "AWS_ENDPOINT_URL"})
        assert r.returncode == 0, r.stderr
        head = client.head_object(Bucket="kbfs-mirror", Key="lab/" + mirrorurl.data_key(p.sha1))
        assert head["ContentLength"] == len(data)
        assert head["ETag"].strip('"').endswith("-3")  # three 8 MiB parts
        assert head["Metadata"]["kbfs-sha1"] == p.sha1
        r = kbfs(tmp_path, "mirror", "push", str(tmp_path / "big.prv"), "s3://kbfs-mirror/lab",
                 env=s3.env)
        assert r.returncode == 0 and b"1 already there" in r.stderr, r.stderr
        r = kbfs(tmp_path, "mirror", "verify", "s3://kbfs-mirror/lab", env=s3.env)
        assert r.returncode == 0, r.stderr + r.stdout
        # Signed reads (credentials configured: presigned URLs).
        r = kbfs(tmp_path, "cat", "--mirror", "s3://kbfs-mirror/lab", str(tmp_path / "remote.prv"),
                 env=s3.env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        # An object replaced by other bytes of the same size is found by verify and passed
        # over by readers (a lying store).
        key = "lab/" + mirrorurl.data_key(p.sha1)
        client.put_object(Bucket="kbfs-mirror", Key=key, Body=data[:-1] + b"?",
                          Metadata={"kbfs-sha1": p.sha1})
        r = kbfs(tmp_path, "mirror", "verify", "s3://kbfs-mirror/lab", env=s3.env)
        assert r.returncode == 1 and r.stdout.startswith(b"wrong " + mirrorurl.data_key(p.sha1).encode())
        r = kbfs(tmp_path, "cat", "--mirror", "s3://kbfs-mirror/lab", str(tmp_path / "remote.prv"),
                 env=s3.env)
        assert r.returncode == 1 and data.startswith(r.stdout[: len(data) - 70000])
        client.put_object(Bucket="kbfs-mirror", Key=key, Body=data, Metadata={"kbfs-sha1": p.sha1})
        # Anonymous reads of a public-read bucket, without credentials (boto3 not needed).
        client.put_bucket_policy(Bucket="kbfs-mirror", Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
                                                    "Action": "s3:GetObject",
                                                    "Resource": "arn:aws:s3:::kbfs-mirror/*"}]}))
        r = kbfs(tmp_path, "cat", "--mirror", "s3://kbfs-mirror/lab", str(tmp_path / "remote.prv"),
                 env={"AWS_ENDPOINT_URL": s3.url})
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        # Bad targets: one line.
        for target in ("s3://Bad_Bucket/x", "/tmp/folder"):
            r = kbfs(tmp_path, "mirror", "push", str(tmp_path / "big.prv"), target, env=s3.env)
            assert r.returncode == 1 and r.stderr.startswith(b"kbfs: error: "), r.stderr
