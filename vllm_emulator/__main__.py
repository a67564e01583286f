"""`python -m vllm_emulator ...` = the `vllm-emulator` command."""
import sys

from vllm_emulator.cli import main

sys.exit(main())
