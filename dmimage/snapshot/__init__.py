"""dm-snapshot's persistent exception store (COW devices): read, check, export, merge."""
