"""Every preset a user can pick, measured: does it learn, what a step costs in time, what it sends.

The study's code is bench/harness/presets.py; this file is its command line."""
import sys

from harness.presets import main

if __name__ == "__main__":
    sys.exit(main())
