"""hetero_shim: run one vLLM model across a node's GPUs and its CPU cores.

    vllm serve MODEL --device heterogeneous --tensor-parallel-size 4
    llm = vllm.LLM(model, device="heterogeneous", tensor_parallel_size=4)

Installed, the package is a vLLM plugin (``hetero_shim.plugin``): the option alone switches the
shim on. ``hetero_shim.enable()``, ``python -m hetero_shim CMD`` and the sitecustomize do the same
without the plugin. Tensor-parallel ranks beyond the node's GPU count become vLLM CPU workers.

Importing this package imports nothing: vLLM imports ``hetero_shim.plugin`` in every process it
starts, so the names below are loaded on first use (PEP 562).
"""

from __future__ import annotations

__version__ = "0.1.0"

_FROM = {
    "enable": "_api",
    "disable": "_api",
    "status": "_api",
    "activate_from_env": "_api",
    "HeteroShimError": "errors",
    "HeteroConfigError": "errors",
    "UnsupportedVllmVersion": "errors",
    "PatchTargetMissing": "errors",
}
__all__ = list(_FROM)

def __getattr__(name: str):
    submodule = _FROM.get(name)
    if submodule is None:
        raise AttributeError(f"module 'hetero_shim' has no attribute {name!r}")
    module = __import__(f"hetero_shim.{submodule}", fromlist=[name])
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM})
