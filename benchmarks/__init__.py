"""Benchmarks of umbrella_llava: `python -m benchmarks.run` (CPU, ratios side by side) and `python -m benchmarks.gpu`."""
