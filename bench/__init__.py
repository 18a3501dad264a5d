from pipeline import cpu_isa as _cpu_isa  # first: the CPU instruction set is pinned before torch loads

_cpu_isa.pin()
