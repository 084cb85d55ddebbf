"""thinwire's benchmarks: the study CLIs (``python bench/<study>.py``) on one harness
(``bench/harness``: the row catalogue, the cached runner, the peers, the network clock,
the results files' manifests). Tests import ``bench.harness.*`` with the repository root
on ``sys.path``; the CLIs, run as scripts, import ``harness.*`` from their own folder."""
