"""Benchmarks: each bench_*.py prints a short table and writes out/bench/<name>.json,
every figure beside a reference measured in the same run (reported as a ratio)."""
