"""Where `kbfs mirror export` / `push` write a mirror: a local folder or an S3 bucket.

Both stores offer the same few operations on object names of `kbfs.mirrorurl`'s layout:
`has(name, size, sha1)` (is a complete object of that size there? for S3 also the
`kbfs-sha1` metadata it was uploaded with, so an object another tool left there is not
taken for ours), `put_stream(name, reader, size, sha1)` (the bytes READ gives, which the
caller has verified or is verifying as they are read), `put_bytes`, `read_index` and
`write_index` (the small `kbfs-mirror.json`).

`DirStore` writes each object to `.NAME.part` beside its place and renames it into place
once complete and flushed, so a folder never holds a partial object under its real name
(a killed export resumes by skipping what is there). `S3Store` (boto3, imported only when
used: the `kbfs[s3]` extra) uploads with boto3's managed transfer: objects over 8 MiB in
8 MiB parts, 4 parts in flight; an object exists only once its upload completed, so the
same rule holds. Incomplete multipart uploads of a killed push stay in the bucket until a
lifecycle rule (or `aws s3api abort-multipart-upload`) removes them.

It does not verify content (the export reads through kbfs's verified reader) and never
deletes anything but an object it has just written with the wrong content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from kbfs import mirrorurl
from kbfs.errors import ConfigError, KbfsError, SourceUnavailable

INDEX_LIMIT = 256 << 20  # bytes of an index read at most
PART_SIZE = 8 << 20
PARALLEL_PARTS = 4

Read = Callable[[int], bytes]


class DirStore:
    """A mirror in a local folder (serve it with any web server that does Range)."""

    def __init__(self, root: str) -> None:
        if os.path.exists(root) and not os.path.isdir(root):
            raise ConfigError(f"{root}: exists and is not a folder")
        self.root = root
        self.where = root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def has(self, name: str, size: int, sha1: str = "") -> bool:
        try:
            st = os.stat(self._path(name))
        except OSError:
            return False
        return st.st_size == size

    def local_path(self, name: str) -> str | None:
        """The file holding NAME (for hashing what an earlier run wrote), else None."""
        path = self._path(name)
        return path if os.path.isfile(path) else None

    def put_stream(self, name: str, read: Read, size: int, sha1: str = "") -> None:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part")
        got = 0
        with open(part, "wb") as f:
            while True:
                chunk = read(PART_SIZE)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if got != size:
            os.unlink(part)
            raise KbfsError(f"{name}: read {got} bytes, expected {size}")
        os.replace(part, path)

    def put_bytes(self, name: str, data: bytes, sha1: str = "") -> None:
        view = memoryview(data)
        pos = [0]

        def read(n: int) -> bytes:
            chunk = bytes(view[pos[0]: pos[0] + n])
            pos[0] += len(chunk)
            return chunk

        self.put_stream(name, read, len(data), sha1)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def read_index(self) -> dict[str, Any] | None:
        try:
            with open(self._path(mirrorurl.INDEX_KEY), "rb") as f:
                raw = f.read(INDEX_LIMIT + 1)
        except FileNotFoundError:
            return None
        return _parse_index(raw, self._path(mirrorurl.INDEX_KEY))

    def write_index(self, index: dict[str, Any]) -> None:
        self.put_bytes(mirrorurl.INDEX_KEY, json.dumps(index, indent=1, sort_keys=True).encode())


def _parse_index(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > INDEX_LIMIT:
        raise KbfsError(f"{where}: larger than {INDEX_LIMIT} bytes; not a kbfs mirror index")
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise KbfsError(f"{where}: not a kbfs mirror index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != mirrorurl.FORMAT \
            or not isinstance(index.get("objects"), dict):
        raise KbfsError(f"{where}: not a {mirrorurl.FORMAT} index")
    return index


class S3Store:
    """A mirror in an S3-compatible bucket, `s3://BUCKET/PREFIX` (boto3)."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise ConfigError("kbfs mirror push needs boto3: pip install 'kbfs[s3]'") from None
        problem, norm = mirrorurl.mirror_problem(url)
        if problem is not None or not norm.startswith("s3://"):
            raise ConfigError(f"{url}: not an s3://BUCKET[/PREFIX] URL"
                              + (f" ({problem})" if problem else ""))
        self.where = norm
        self.bucket, _, prefix = norm[len("s3://"):].partition("/")
        self.prefix = prefix + "/" if prefix else ""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL") or None
        self._s3 = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, config=Config(signature_version="s3v4",
                                                       retries={"max_attempts": 3}))
        self._transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                        max_concurrency=PARALLEL_PARTS, use_threads=True)
        self._errors = _boto_errors()

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self._s3.head_object(Bucket=self.bucket, Key=self.prefix + name))
        except self._errors as exc:
            if _status(exc) in (404, 403):
                return None
            raise SourceUnavailable(f"{self.where}: {_why(exc)}") from None

    def has(self, name: str, size: int, sha1: str = "") -> bool:
        head = self._head(name)
        if head is None or head.get("ContentLength") != size:
            return False
        return not sha1 or (head.get("Metadata") or {}).get("kbfs-sha1") == sha1

    def local_path(self, name: str) -> str | None:
        return None

    def put_stream(self, name: str, read: Read, size: int, sha1: str = "") -> None:
        reader = _ReadAdapter(read)
        try:
            self._s3.upload_fileobj(reader, self.bucket, self.prefix + name, Config=self._transfer,
                                    ExtraArgs={"Metadata": {"kbfs-sha1": sha1} if sha1 else {},
                                               "ContentType": "application/octet-stream"})
        except self._errors as exc:
            raise SourceUnavailable(f"{self.where}: uploading {name}: {_why(exc)}") from None
        if reader.got != size:
            self.remove(name)
            raise KbfsError(f"{name}: read {reader.got} bytes, expected {size}")

    def put_bytes(self, name: str, data: bytes, sha1: str = "") -> None:
        head = self._head(name)
        if head is not None and head.get("ETag", "").strip('"') == hashlib.md5(data).hexdigest() \
                and (not sha1 or (head.get("Metadata") or {}).get("kbfs-sha1") == sha1):
            return  # the same bytes are there already (a single-part object's ETag is its MD5)
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data,
                                Metadata={"kbfs-sha1": sha1} if sha1 else {},
                                ContentType="application/octet-stream")
        except self._errors as exc:
            raise SourceUnavailable(f"{self.where}: uploading {name}: {_why(exc)}") from None

    def remove(self, name: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        except self._errors:
            pass

    def read_index(self) -> dict[str, Any] | None:
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + mirrorurl.INDEX_KEY)
        except self._errors as exc:
            if _status(exc) in (404, 403):
                return None
            raise SourceUnavailable(f"{self.where}: {_why(exc)}") from None
        return _parse_index(obj["Body"].read(INDEX_LIMIT + 1), self.where + "/" + mirrorurl.INDEX_KEY)

    def write_index(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, indent=1, sort_keys=True).encode()
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self.prefix + mirrorurl.INDEX_KEY,
                                Body=data, ContentType="application/json")
        except self._errors as exc:
            raise SourceUnavailable(f"{self.where}: writing the index: {_why(exc)}") from None


class _ReadAdapter:
    """A file-like object over READ for boto3 (which reads it sequentially, part by part)."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._read(n if n and n > 0 else PART_SIZE)
        self.got += len(chunk)
        return chunk

    def readable(self) -> bool:
        return True


def _boto_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _status(exc: BaseException) -> int:
    resp = getattr(exc, "response", None) or {}
    try:
        return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


def _why(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def open_store(target: str, endpoint_url: str | None = None) -> DirStore | S3Store:
    """The store TARGET names: s3://BUCKET[/PREFIX], else a local folder."""
    if target.startswith("s3://"):
        return S3Store(target, endpoint_url)
    if "://" in target:
        raise ConfigError(f"{target}: export writes a local folder; "
                          "use `kbfs mirror push SOURCE... s3://BUCKET/PREFIX` for a bucket")
    return DirStore(target)
