"""Benchmarks of the launcher and the adapter against their peers: ``python -m bench``.

See ``bench/README.md``. Every ``bench/<name>_bench.py`` module is discovered by the runner
(``bench/__main__.py``) and writes ``bench/results/<name>.json``.
"""
