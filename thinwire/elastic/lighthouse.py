"""``python <this file> --bind host:port ...``: torchft's lighthouse where its
``torchft_lighthouse`` script is not on PATH (a virtual environment that shares torchft's
site-packages). Run by path, not with ``-m``: torchft's lighthouse parses the process's own
arguments after the first, so the first must be this file."""
import sys

if __name__ == "__main__":
    from torchft._torchft import lighthouse_main

    sys.exit(lighthouse_main())
