"""Small reference models used by the demo, the benchmarks, the notebooks and the tests."""
