"""Benchmarks: ``sors bench`` (:mod:`bench.cli`, cases in :mod:`bench.cases` and :mod:`bench.fanout`, the
timing harness in :mod:`bench.harness`) and the one-shot GPU run ``bench/gpu_bench.py``."""
