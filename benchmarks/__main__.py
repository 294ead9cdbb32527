"""`python -m benchmarks [--quick] [--only NAME,...] [--out DIR]`: every benchmark, one report."""

from benchmarks.run import main

main()
