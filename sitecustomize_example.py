"""Example sitecustomize.py: activate hetero_shim in every Python process of an environment.

Copy this file as ``sitecustomize.py`` into a folder on the interpreter's path (for a
virtualenv: ``cp sitecustomize_example.py .venv/lib/python3.X/site-packages/sitecustomize.py``),
keeping any code your environment already had in its sitecustomize below the marked line.
Then ``HETERO_SHIM_ENABLE=1 vllm serve MODEL --device heterogeneous --tensor-parallel-size 4``
runs patched, and so does every process vLLM spawns; ``HETERO_SHIM_ENABLE=0`` (or unset)
leaves vLLM stock. Patching waits until vLLM is imported: other programs pay a few
milliseconds for importing hetero_shim when the switch is set, nothing when it is unset.
"""

import os

if "HETERO_SHIM_ENABLE" in os.environ:
    try:
        import hetero_shim
    except ImportError:
        pass
    else:
        hetero_shim.activate_from_env()

# --- your environment's own sitecustomize code, if it had any, goes below ---
