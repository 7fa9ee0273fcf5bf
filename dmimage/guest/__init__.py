"""The QEMU guest: appliance, kernels, machine + QMP, agent, dm status parsing (docs/vm.md).

Importing this package imports nothing else: the pytest plugin (``pytest_plugin``) is loaded
into every pytest run and must stay cheap.
"""
