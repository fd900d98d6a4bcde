"""`python -m kbfs`: the same as the `kbfs` command."""

from kbfs.cli import main

main()
