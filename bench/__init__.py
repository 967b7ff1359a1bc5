"""Side-by-side benchmarks: each module's ``run(quick)`` measures ours and its anchor in the same run."""
