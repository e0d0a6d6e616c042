"""Patches of targets vLLM calls every step; applied only in processes in heterogeneous mode."""
