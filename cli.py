"""The `offload` command, run from a source checkout: `python cli.py ...` (installed, it is the
`offload` script; the code is `offload/cli.py`)."""

from offload.cli import main

if __name__ == "__main__":
    main()
