from pipeline import cpu_isa as _cpu_isa  # noqa: E402 - first: the CPU instruction set is pinned before torch loads

_cpu_isa.pin()
