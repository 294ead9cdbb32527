"""gpt_fn's benchmarks: each module times one thing and exposes `run(quick)` and `markdown(result)`.

`python -m benchmarks` (or `python benchmarks/run.py`) runs them all and writes one report;
see benchmarks/README.md.
"""
