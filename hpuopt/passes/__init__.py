"""hpuopt's graph passes, one per module. The pipeline order lives in :mod:`hpuopt.pipeline`."""
