"""Patches applied while vLLM starts an engine and its workers (configuration, processes, groups)."""
