"""The shared quality harness: val loss vs dense at equal steps, paired seeds, bytes per parameter per step.

The study's code is bench/harness/quality.py; this file is its command line."""
import sys

from harness.quality import main

if __name__ == "__main__":
    sys.exit(main())
