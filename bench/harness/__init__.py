"""The benchmarks' harness, shared by every study CLI in bench/:

- ``catalogue``: every named method (a row: name -> thinwire config overrides), defined once
- ``runs``: the cached runner (run dirs keyed by a row's overrides and thinwire's code version)
- ``manifest``: each results file's manifest (command, commit, date, machine load)
- ``peers`` and ``cluster_peer``: torch's and torchft's peers, run on thinwire's Trainer
- ``netclock_*``: the network clock (model, projections, steps to target, report, validation)
- ``quality``, ``time_to_target``, ``presets``: the studies' logic (their CLIs are bench/*.py)
- ``tables``: markdown rows shared by the reports

Imports inside the harness are relative, so it imports both as ``harness`` (the CLIs, run as
``python bench/<study>.py``) and as ``bench.harness`` (the tests).
"""
import os

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
