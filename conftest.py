"""The repository root on ``sys.path`` for the tests (pytest inserts this file's folder): tests
import the benchmarks' harness as ``bench.harness.*`` without path manipulation of their own."""
