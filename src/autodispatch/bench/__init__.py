"""Benchmarks: commands that print figures, recorded in docs/benchmarks.md (never timed
tests, which flake on a shared machine).

- ``contention``: mechanics racing over HTTP for queued requests (`bench contention`);
- ``realtime``: fan-out latency, capacity and memory of the realtime gateway
  (`bench realtime`), with its load generators, workload and floor;
- ``writes``: what the event log costs the writers (`bench writes`);
- ``machine``: the line each report starts with, saying what it ran on.
"""
