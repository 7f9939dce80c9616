"""Benchmarks: commands that print measured rates and their ratio to a limit measured in the same run."""
