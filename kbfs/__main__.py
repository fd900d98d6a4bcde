"""`python -m kbfs`: the same as the `kbfs` command.

The cyclic GC is off while the command line's modules are imported (see `kbfs.cli.main`,
which turns it back on before the command runs).
"""

import gc

gc.disable()

from kbfs.cli import main  # noqa: E402 - imported with the GC off, on purpose

main(gc_paused=True)
