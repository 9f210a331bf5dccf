"""The embedded dev stack (SeaweedFS runner) and the benchmarks."""
