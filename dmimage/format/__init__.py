"""On-disk layouts of dm-thin-pool metadata: construct Structs, numpy dtypes, salts.

No I/O and no policy here; every number comes from the kernel's format (thin-format.md).
"""
