"""Tools that show on a CPU what a GPU would see: compile-only launches, host-sync counts, the GPU scenarios."""
