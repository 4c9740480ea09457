"""``python -m carnet``: the same command line as the ``carnet`` script."""

from .cli import main

main()
