"""Benchmarks. Each prints ratios against a reference measured in the same run; nothing here is asserted."""
