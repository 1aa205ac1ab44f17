"""Benchmarks, installed as eqm_bench: run them as scripts (python bench/throughput.py) or import them."""
