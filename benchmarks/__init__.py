"""Side-by-side benchmarks: every figure is a ratio measured in one run, on the machine named
in the output. Run `python -m benchmarks --help` from the repository root."""
