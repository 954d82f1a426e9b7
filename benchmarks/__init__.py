"""safeopt's benchmarks (installed as ``safeopt_bench``): overhead and stability."""
