"""ListOps (Long Range Arena) main job: ``python -m benchmarks.listops``."""
