"""Operations: demo data, benchmarks (and later audit, repair, probe)."""
