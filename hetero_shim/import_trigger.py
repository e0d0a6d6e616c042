"""Run a function just before a package's own code first runs (:func:`run_before_import`), or once
a module has finished executing (:func:`after_import`), importing nothing until then.

enable() patches vLLM through wrapt's post-import hooks, but importing wrapt costs 15-25 ms
(it imports asyncio), and the patch modules and their table as much again. A process that
enables the shim and never imports vLLM should not pay that. So until vLLM is imported only
this finder waits, first on ``sys.meta_path``: when ``import vllm`` starts, it hands back
vLLM's own spec with a loader that first removes the finder, runs the callback (which imports
wrapt and registers the hooks for vLLM's modules) and then runs vLLM's loader. ``vllm`` is
then in ``sys.modules`` but none of its code has run, so every patched module is still to come.

A finder only probed (``importlib.util.find_spec("vllm")``, as some libraries do to see what
is installed) stays armed: nothing runs before the package's code does.
"""

from __future__ import annotations

import sys


class BeforeImport:
    """A ``sys.meta_path`` finder that runs ``callback()`` once, before ``package`` executes."""

    def __init__(self, package: str, callback) -> None:
        self.package = package
        self.callback = callback
        self.fired = False
        self._searching = False

    @property
    def armed(self) -> bool:
        return any(finder is self for finder in sys.meta_path)

    def arm(self) -> None:
        if not self.armed and not self.fired:
            sys.meta_path.insert(0, self)

    def disarm(self) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]

    # -- the finder protocol ------------------------------------------------------------
    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.package or self.fired or self._searching:
            return None
        self._searching = True  # the other finders may ask importlib again: answer None then
        try:
            spec = spec_from_other_finders(self, fullname, path, target)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return None  # not (yet) installed: stay armed
        if not hasattr(spec.loader, "exec_module"):  # an old-style loader cannot be preceded: run now
            self._fire()
            return spec
        spec.loader = _RunFirst(self, spec.loader)
        return spec

    def _fire(self) -> None:
        if self.fired:
            return
        self.fired = True
        self.disarm()
        try:
            self.callback()
        except BaseException:  # the import fails with this error; so will the next attempt
            self.fired = False
            self.arm()
            raise


class _RunFirst:
    """The package's loader, preceded by the trigger's callback (every other attribute is the loader's)."""

    def __init__(self, trigger: BeforeImport, loader) -> None:
        self._trigger = trigger
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def exec_module(self, module) -> None:
        # The module's code sees its real loader, as without the trigger.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._trigger._fire()
        self._loader.exec_module(module)


def run_before_import(package: str, callback) -> BeforeImport | None:
    """Run ``callback()`` now if ``package`` is imported already, else just before it is.

    Returns the armed trigger (``disarm()`` cancels it), or None when the callback ran now.
    """
    if package in sys.modules:
        callback()
        return None
    trigger = BeforeImport(package, callback)
    trigger.arm()
    return trigger


def spec_from_other_finders(skip, fullname, path=None, target=None):
    """The spec that the finders on ``sys.meta_path`` other than ``skip`` give for ``fullname``."""
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None) if finder is not skip else None
        if find is not None:
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
    return None


def after_import(name: str, callback) -> None:
    """Call ``callback(module)`` once module ``name`` has been executed: now if it has been; when
    importlib marks it initialized if it is being executed now (vLLM resolves its platform, and so
    loads this plugin, in the middle of importing ``vllm.engine.arg_utils`` on some paths); or when
    it is imported later. The callback must not raise (it runs inside importlib's ``finally``)."""
    module = sys.modules.get(name)
    if module is None:
        if not any(isinstance(f, _WhenExecuted) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _WhenExecuted(name, callback))
        return
    spec = getattr(module, "__spec__", None)
    if spec is not None and getattr(spec, "_initializing", False):
        _notify_when_initialized(spec, callback)
    else:
        callback(module)


def _notify_when_initialized(spec, callback) -> None:
    """importlib sets ``spec._initializing = False`` when the module's code has run (or failed):
    a subclass of the spec's class sees that assignment, puts the class back and calls back."""
    original_class = type(spec)
    if getattr(original_class, "_hetero_shim_notifies", False):
        return

    class _Notifying(original_class):  # type: ignore[misc, valid-type]
        _hetero_shim_notifies = True

        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "_initializing" and not value:
                self.__class__ = original_class
                module = sys.modules.get(self.name)
                if module is not None and getattr(module, "__spec__", None) is self:
                    try:
                        callback(module)
                    except Exception:  # noqa: BLE001, S110 - must not break the import that just finished
                        pass

    spec.__class__ = _Notifying


class _WhenExecuted:
    """A ``sys.meta_path`` finder that hands importlib the module's own spec, set to call back once
    the module has been executed; it leaves ``sys.meta_path`` at that point."""

    def __init__(self, name: str, callback) -> None:
        self.name = name
        self.callback = callback
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._searching:
            return None
        self._searching = True
        try:
            spec = spec_from_other_finders(self, fullname, path, target)
        finally:
            self._searching = False
        if spec is None:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        try:
            _notify_when_initialized(spec, self.callback)
        except TypeError:  # a spec class that cannot be swapped: the general plugin still installs it
            pass
        return spec
