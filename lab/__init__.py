"""The lab: the real serving stack on emulated heterogeneous hardware, on one Linux machine.

Hosts are network namespaces joined through a bridge, links are shaped with
tc, devices are CPU-quota cgroups with a KV-cache size, and each host runs a
real Ray node; `python -m lab up lab.json` builds it (docs/lab.md).
"""
