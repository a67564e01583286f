"""The application layer: the `vllm-emulator` command, above both drivers (server/ and loadgen/)."""
