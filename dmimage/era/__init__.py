"""dm-era metadata: read, check, dump and invalidate (format/era.py has the layouts)."""
