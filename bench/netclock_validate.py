"""The network clock against launch/netsim's shaped links (run as root).

The study's code is bench/harness/netclock_validate.py; this file is its command line."""
import sys

from harness.netclock_validate import main

if __name__ == "__main__":
    sys.exit(main())
