"""The user's main module and ``spawn``: a script that builds its engine at the top level.

``spawn`` starts a child by importing the parent's main module again (as ``__mp_main__``), so a
script whose ``LLM(...)`` is not under ``if __name__ == "__main__":`` would build a second
engine in every child; Python stops that with its bootstrapping ``RuntimeError``. Stock vLLM on
a CUDA host forks, so such scripts work there; heterogeneous mode must spawn its workers (a CPU
rank needs a fresh interpreter). So:

- :func:`engine_built_unguarded` tells, while the engine config is made, whether the engine is
  being built by unguarded top-level code of the main script;
- :func:`main_hidden` hides such a main module from ``spawn`` while a worker starts (the worker
  runs vLLM's code only and never needed the script);
- where the engine core itself would be spawned from such a script (vLLM's CPU build always
  spawns), the caller refuses with :func:`unguarded_message`, one line, instead of Python's
  bootstrapping traceback from the child.
"""

from __future__ import annotations

import ast
import sys
from types import ModuleType

from hetero_shim import settings


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either side of the comparison)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names and consts)


def statement_is_guarded(source: str, lineno: int) -> bool:
    """Whether line ``lineno`` of a module's source lies inside a top-level ``__main__`` guard."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return True  # cannot tell: leave stock behaviour alone
    for node in tree.body:
        end = getattr(node, "end_lineno", node.lineno)
        if node.lineno <= lineno <= end:
            return _is_main_guard(node)
    return True


def _reimported_by_spawn(main: ModuleType | None) -> bool:
    """spawn imports the main module again when it came from a file or ``-m`` (not ``-c``, not a REPL)."""
    if main is None:
        return False
    spec = getattr(main, "__spec__", None)
    return bool(getattr(spec, "name", None) or getattr(main, "__file__", None))


def engine_built_unguarded() -> bool:
    """Called while the engine config is made: is the main script's top-level code, outside a
    ``__main__`` guard, what is building this engine?"""
    main = sys.modules.get("__main__")
    if not _reimported_by_spawn(main):
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            break
        frame = frame.f_back
    if frame is None:  # the main module finished (a server, a REPL-like driver): nothing re-runs it
        return False
    path = getattr(main, "__file__", None)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError):
        return False
    return not statement_is_guarded(source, frame.f_lineno)


def engine_core_spawns() -> bool:
    """Whether vLLM will start the engine core with spawn (its own rule, ``_maybe_force_spawn``:
    the setting, which vLLM's CPU platform sets, or CUDA already initialized in this process)."""
    if settings.engine_core_in_process():
        return False  # the engine core runs in this process
    if settings.spawn_requested():
        return True
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def unguarded_message() -> str:
    main = sys.modules.get("__main__")
    where = getattr(main, "__file__", None) or "your script"
    return (
        f"{where} builds the vLLM engine at its top level, and this vLLM starts its engine process with "
        "'spawn', which runs the script again in that process: put the code that creates the LLM under "
        "`if __name__ == \"__main__\":`"
    )


class main_hidden:  # noqa: N801 - used as a function: `with main_hidden(True): process.start()`
    """While active (and ``hide`` is true), ``spawn`` does not import the main module in the child."""

    def __init__(self, hide: bool) -> None:
        self._hide = hide
        self._saved: ModuleType | None = None

    def __enter__(self) -> None:
        if self._hide:
            self._saved = sys.modules.get("__main__")
            stand_in = ModuleType("__main__")  # no __file__, no __spec__: spawn has nothing to import
            sys.modules["__main__"] = stand_in

    def __exit__(self, *exc_info) -> None:
        if self._saved is not None:
            sys.modules["__main__"] = self._saved
            self._saved = None
