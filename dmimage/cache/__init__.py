"""dm-cache metadata: read, check and dump (format/cache.py has the layouts)."""
