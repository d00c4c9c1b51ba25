"""``python -m minisd ...``: the same command as ``minisd ...`` (minisd/cli.py), for environments
where the script is not on PATH."""
import sys

from minisd.cli import main

if __name__ == "__main__":
    sys.exit(main())
