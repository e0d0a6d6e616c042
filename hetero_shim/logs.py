"""One logger for the shim, a child of vLLM's: it prints with vLLM's format once vLLM has set up logging."""

import logging

log = logging.getLogger("vllm.hetero_shim")
