"""One rank of one bench/cluster.py row (launched by launch/netsim or torchrun): thinwire's Trainer
with thinwire's comm or torch's peers.

The study's code is bench/harness/cluster_peer.py; this file is its command line."""
import sys

from harness.cluster_peer import main

if __name__ == "__main__":
    sys.exit(main())
