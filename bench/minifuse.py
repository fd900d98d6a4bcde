"""The least a pyfuse3 + trio file system can do: one read-only file, each read one pread.

A yardstick for bench_mount.py, not part of kbfs: it shows what a FUSE read costs in
pyfuse3 and trio alone (request from /dev/fuse, a task, the reply), so the mount's
random-read latency can be told apart from that floor. It has no cache, no
verification; reads are answered on the trio thread from the backing file, or with
`--thread` by a worker thread (`trio.to_thread.run_sync(os.pread, ...)`, as kbfs's mount
answers every read): the difference between the two is what one thread hop per read costs,
i.e. the most an inline fast path could save (bench_mount's A/B).

Usage: minifuse.py [--thread] FILE MOUNTPOINT   (foreground; SIGINT/SIGTERM unmount and exit)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class OneFile(pyfuse3.Operations):
    """The root folder holding one file, NAME, whose bytes are those of the file at FD."""

    def __init__(self, fd: int, name: bytes, thread: bool = False) -> None:
        super().__init__()
        self.fd, self.name, self.size = fd, name, os.fstat(fd).st_size
        self.thread = thread

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.entry_timeout = attrs.attr_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_size = self.size
        return attrs

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.thread:
            return await trio.to_thread.run_sync(os.pread, self.fd, size, off)
        return os.pread(self.fd, size, off)


async def _serve(ops: OneFile, mountpoint: str) -> None:
    options = set(pyfuse3.default_options)
    options.add("fsname=minifuse")
    options.add("ro")
    options.add("noatime")
    pyfuse3.init(ops, mountpoint, options)
    print("ready", flush=True)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        pyfuse3.close(unmount=True)


def main() -> int:
    args = sys.argv[1:]
    thread = "--thread" in args
    args = [a for a in args if a != "--thread"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path, mountpoint = args
    fd = os.open(path, os.O_RDONLY)
    trio.run(_serve, OneFile(fd, os.path.basename(path).encode(), thread), mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
