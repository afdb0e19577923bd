"""Benchmarks of the pipeline's stages, each a ratio against a baseline run on the same machine.

``python -m bench.run`` measures them and rewrites ``BENCHMARKS.md``; one module per benchmark.
"""
