"""The simulation core (no I/O, no asyncio). Its hot modules run compiled where `make setup` built them
(emulator/_compiled.py says when)."""
from emulator._compiled import install as _install_compiled

_install_compiled()
