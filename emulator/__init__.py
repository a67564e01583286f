"""The simulation core (no asyncio, and no I/O beyond reading its own data files). Its hot modules run compiled
where `make setup` built them (emulator/_compiled.py says when)."""
from emulator._compiled import install as _install_compiled

_install_compiled()
