"""MountainLab .mda files for the view tests and bench: a header, then data written only in
a few regions (a sparse file elsewhere, so a 2 GiB recording costs a few MiB of disk).

    write_mda(path, channels=32, samples=N, regions=[(t0, t1), ...])   # int16
    truth(t, channels)    # the value a written region holds at timepoint t, per channel
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

CODES = {"uint8": -2, "float32": -3, "int16": -4, "int32": -5, "uint16": -6, "float64": -7, "uint32": -8}


def header(dtype: str, dims: list[int], wide: bool = False) -> bytes:
    import numpy as np

    bpe = np.dtype(dtype).itemsize
    fmt = "<q" if wide else "<i"
    return struct.pack("<iii", CODES[dtype], bpe, -len(dims) if wide else len(dims)) + b"".join(
        struct.pack(fmt, d) for d in dims)


def truth(t: Any, channels: int) -> Any:
    """int16 samples [len(t), channels]: a sine per channel (its own period) and an offset."""
    import numpy as np

    t = np.asarray(t, dtype=np.int64)[:, None]
    c = np.arange(channels, dtype=np.int64)[None, :]
    return (np.round(900 * np.sin(2 * np.pi * t / (300 + 41 * c))) + 50 * c).astype("<i2")


def write_mda(path: Path, channels: int, samples: int, regions: list[tuple[int, int]],
              chunk: int = 1 << 16) -> int:
    """A 2-D int16 .mda of CHANNELS x SAMPLES with truth() in REGIONS, zeros (holes) elsewhere;
    returns the header's length."""
    import numpy as np

    hdr = header("int16", [channels, samples])
    stride = 2 * channels
    with open(path, "wb") as f:
        f.write(hdr)
        f.truncate(len(hdr) + stride * samples)
        for t0, t1 in regions:
            for a in range(t0, t1, chunk):
                b = min(t1, a + chunk)
                f.seek(len(hdr) + a * stride)
                f.write(truth(np.arange(a, b), channels).tobytes())
    return len(hdr)
