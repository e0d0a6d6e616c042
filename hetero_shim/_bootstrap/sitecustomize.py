"""Bootstrap for child processes: ``python -m hetero_shim`` and ``enable()`` put this folder
on PYTHONPATH, so every Python process started below them runs this file at start-up.

It activates hetero_shim when HETERO_SHIM_ENABLE=1 (patching happens once vLLM is
imported; until then a process pays for importing hetero_shim and reading its settings, a
few milliseconds), then runs the user's own sitecustomize, if any, which this file would
otherwise hide.
"""

import importlib.machinery
import os
import sys


def _chain_user_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    others = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec  # only when there is one: it costs ~2 ms

    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _activate():
    if "HETERO_SHIM_ENABLE" not in os.environ:  # unset: off, and hetero_shim need not be imported
        return
    try:
        import hetero_shim
    except ImportError:  # the package is not importable from this interpreter
        return
    hetero_shim.activate_from_env()


_activate()
_chain_user_sitecustomize()
