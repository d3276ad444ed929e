"""`python -m offload ...`: the `offload` command."""

from offload.cli import main

main()
