"""Tools that show on a CPU what a GPU would see.

- :mod:`.compile_only`: Triton launches compiled for a GPU target (sm_90, sm_80) instead of run, with resources.
- :mod:`.gpu_scenarios`: the public ops and modules at production shapes under it; the resource table.
- :mod:`.host_syncs`: device-to-host syncs a step would make on a GPU, counted on a CPU.
- :mod:`.interpreter_bounds`: out-of-bounds loads/stores of kernels run in Triton's CPU interpreter.
- :mod:`.resource_summary`: a markdown summary of a resource table.
"""
