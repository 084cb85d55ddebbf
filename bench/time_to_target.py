"""Steps to target: how many steps a method needs to reach dense DDP's quality (WSD decay branches).

The study's code is bench/harness/time_to_target.py; this file is its command line."""
import sys

from harness.time_to_target import main

if __name__ == "__main__":
    sys.exit(main())
