"""Tools around conversion that are not the library call: layout fixtures (random
checkpoints in released layouts, for the tests, the demo and the benchmarks)."""
