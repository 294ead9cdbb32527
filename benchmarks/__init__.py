"""gpt_fn's benchmarks: each module times one thing and exposes `run(quick, **sizes)` and
`markdown(result)`; `timing` holds how they all time, `run` the runner and its writer.

`python -m benchmarks` (or `python benchmarks/run.py`) runs them all and writes one report;
see benchmarks/README.md.
"""
