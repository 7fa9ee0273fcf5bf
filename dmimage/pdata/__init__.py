"""Generic persistent-data: block access, btrees and space maps (the kernel's persistent-data/)."""
