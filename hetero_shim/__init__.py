"""hetero_shim: run one vLLM model across a node's GPUs and its CPU cores.

    import hetero_shim
    hetero_shim.enable()
    llm = vllm.LLM(model, device="heterogeneous", tensor_parallel_size=4)

Tensor-parallel ranks beyond the node's GPU count become vLLM CPU workers; all ranks talk
over gloo. Importing this package does not import vLLM, torch or wrapt.
"""

from hetero_shim._api import activate_from_env, disable, enable, status
from hetero_shim.errors import HeteroConfigError, HeteroShimError, PatchTargetMissing, UnsupportedVllmVersion

__all__ = [
    "enable",
    "disable",
    "status",
    "activate_from_env",
    "HeteroShimError",
    "HeteroConfigError",
    "UnsupportedVllmVersion",
    "PatchTargetMissing",
]
__version__ = "0.1.0"
