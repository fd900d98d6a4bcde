"""Run every benchmark in bench/ one after another and keep their output in bench/out/.

Benchmarks compare kbfs with a reference tool side by side in one run and print
ratios (these machines are shared and noisy); docs/benchmarks.md reports them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    names = sys.argv[1:] or sorted(
        n[len("bench_") : -3] for n in os.listdir(HERE) if n.startswith("bench_") and n.endswith(".py")
    )
    failed = []
    for name in names:
        script = os.path.join(HERE, f"bench_{name}.py")
        print(f"== bench {name}", flush=True)
        started = time.monotonic()
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as log:
            proc = subprocess.Popen(
                [sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        print(f"== bench {name}: exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
