"""The errors hetero_shim raises. Each message says what was wrong and what is supported."""


class HeteroShimError(Exception):
    """Base class: something hetero_shim refuses to do."""


class UnsupportedVllmVersion(HeteroShimError, ImportError):
    """The installed vLLM release has no patch table (raised before anything is patched)."""


class HeteroConfigError(HeteroShimError, ValueError):
    """A heterogeneous-mode setting (option, environment variable, bind list) is invalid."""


class PatchTargetMissing(HeteroShimError, AttributeError):
    """A patch table names a target that the installed vLLM does not have."""
