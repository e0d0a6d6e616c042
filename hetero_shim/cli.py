"""The ``hetero-shim`` command.

    hetero-shim plan MODEL [vLLM engine arguments]   the rank plan of a heterogeneous run, no engine started
    hetero-shim status                                release, patch table, what is patched, settings in force
    hetero-shim run CMD [ARGS...]                     the launcher (same as ``python -m hetero_shim CMD``)
    hetero-shim --version

``plan`` parses its arguments with vLLM's own parser (``EngineArgs.add_cli_args``), so every engine
argument of ``vllm serve`` works, and runs vLLM's own ``EngineArgs.create_engine_config()`` with
``device="heterogeneous"`` under the shim: the shim's planning (patches/startup/device_option.py)
makes the plan exactly as a real start would, and refuses what a real start would refuse. Bad input
ends with one line on stderr and exit status 2. Without the console script: ``python -m hetero_shim.cli``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

PROG = "hetero-shim"
SUBCOMMANDS = ("plan", "status", "run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from hetero_shim import __version__

        print(f"hetero_shim {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "plan":
        return plan(rest)
    if command == "status":
        return status(rest)
    if command == "run":
        return _launch(rest)
    if command.startswith("-"):
        print(f"{PROG}: unknown option {command!r}; see {PROG} --help", file=sys.stderr)
        return 2
    return _launch(argv)  # `hetero-shim vllm serve ...`: the launcher, as `python -m hetero_shim` is


def _launch(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        _command_parser("run").print_help()
        return 0
    from hetero_shim.__main__ import main as launcher

    return launcher(argv)


# -- help ------------------------------------------------------------------------------------------
def documented_settings() -> list[tuple[str, str]]:
    """(variable, its doc) for every environment variable hetero_shim/settings.py documents with
    ``#:`` comment lines above its name (the one place settings are described)."""
    from hetero_shim import settings

    with open(settings.__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found: list[tuple[str, str]] = []
    comment: list[str] = []
    for line in lines:
        if line.startswith("#:"):
            comment.append(line[2:].strip())
            continue
        match = re.match(r'^[A-Z][A-Z0-9_]* = "([A-Z][A-Z0-9_]+)"\s*$', line)
        if match and comment:
            found.append((match.group(1), " ".join(comment)))
        comment = []
    return found


def _settings_epilog() -> str:
    import textwrap

    rows = ["settings (environment variables; hetero_shim/settings.py):"]
    for name, doc in documented_settings():
        rows.append(f"  {name}")
        rows.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(rows)


def _parser(prog: str, description: str, usage: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, usage=usage, description=description, epilog=_settings_epilog(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _top_parser() -> argparse.ArgumentParser:
    commands = __doc__.split("\n\n")[1]  # the command list at the top of this module
    return _parser(PROG, "Run one vLLM model across a node's GPUs and CPU cores.\n\n" + commands,
                   usage=f"{PROG} {{plan,status,run}} ... | {PROG} --version")


#: each command's help: (description, usage)
COMMAND_HELP = {
    "plan": (
        "Print the rank plan of a heterogeneous run of MODEL without starting an engine: GPU or CPU per\n"
        "rank, each CPU rank's cores and KV cache budget, the cores kept free, the pipeline layer split,\n"
        "the GPU memory the GPU ranks take, the CPU kernels the CPU ranks load, and warnings.\n"
        "Arguments after MODEL are vLLM's engine arguments, as `vllm serve` takes them\n"
        "(--tensor-parallel-size 4, --pipeline-parallel-size 2 --hetero-gpu-layers 20, --dtype, ...).\n"
        "Exit status 2 with one line on stderr when the run would be refused.",
        f"{PROG} plan MODEL [vLLM engine arguments]"),
    "status": (
        "Print the installed vLLM release, the patch table chosen for it, every patch of that table\n"
        "(target, when it applies, why, when it can go), whether vLLM will load hetero_shim's plugins,\n"
        "and the settings in force. Exit status 2 when no table fits the installed vLLM.",
        f"{PROG} status"),
    "run": (
        "Run CMD with the shim active in it and in every process it starts (the launcher; same as\n"
        "`python -m hetero_shim CMD`). Not needed for vLLM's own commands once hetero_shim is\n"
        "installed: `vllm serve MODEL --device heterogeneous` switches the shim on by itself.",
        f"{PROG} run CMD [ARGS...]   e.g. {PROG} run python my_script.py"),
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    description, usage = COMMAND_HELP[command]
    return _parser(f"{PROG} {command}", description, usage=usage)


# -- status ----------------------------------------------------------------------------------------
def status(argv: list[str]) -> int:
    parser = _command_parser("status")
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    parser.parse_args(argv)
    from hetero_shim import __version__, _api, settings, versions
    from hetero_shim.errors import HeteroShimError

    print(f"hetero_shim {__version__}")
    found = versions.installed()
    print(f"vLLM: {f'{found.distribution} {found.version}' if found else 'not installed'}")
    code = 0
    try:
        release, reason = versions.choose_table(versions.SUPPORTED, found)
    except HeteroShimError as exc:
        print(f"patch table: none. {exc}")
        release, code = None, 2
    else:
        print(f"patch table: {release} ({reason})")
    print(f"plugins: {_plugin_state(_api)}")
    if release is not None:
        from hetero_shim.patches import tables

        print(f"\nwhat is patched (table {release}; per-step rows wait for heterogeneous mode):")
        for patch in tables.table(release):
            when = "heterogeneous mode only" if patch.hetero_only else "when its module is imported"
            sites = ", ".join(patch.sites())
            print(f"  {patch.concern}: {patch.name}")
            print(f"      in {sites}; {when}{'; optional' if patch.optional else ''}")
            if patch.why:
                print(f"      why: {patch.why}")
            if patch.remove_when:
                print(f"      remove when: {patch.remove_when}")
    print("\nsettings in force:")
    for name, _doc in documented_settings():
        value = os.environ.get(name)
        print(f"  {name}={value}" if value is not None else f"  {name} (unset)")
    try:
        settings.check_environment()
    except HeteroShimError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return code


def _plugin_state(api) -> str:
    from importlib.metadata import entry_points

    groups = {group: any(ep.name == "hetero_shim" for ep in entry_points(group=group))
              for group in ("vllm.platform_plugins", "vllm.general_plugins")}
    if not all(groups.values()):
        missing = ", ".join(g for g, present in groups.items() if not present)
        return (f"entry points missing ({missing}): reinstall hetero_shim (pip install .); until then use "
                "enable() or the launcher")
    filtered = api.plugins_filtered_out()
    if filtered is not None:
        return api.plugins_filtered_message(filtered)
    return "installed; `--device heterogeneous` / device=\"heterogeneous\" switch the shim on in any vLLM process"


# -- plan ------------------------------------------------------------------------------------------
class _OneLineError(Exception):
    pass


def plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _command_parser("plan").print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        return _plan(argv)
    except _OneLineError as exc:
        print(f"{PROG} plan: {exc}", file=sys.stderr)
        return 2


def _plan(argv: list[str]) -> int:
    from hetero_shim import settings, versions
    from hetero_shim.errors import HeteroShimError

    try:
        settings.check_environment()
        versions.choose_table(versions.SUPPORTED)
    except HeteroShimError as exc:
        raise _OneLineError(str(exc)) from None
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's INFO lines are not the plan; warnings are kept
    import hetero_shim

    hetero_shim.enable(propagate=False)  # before vLLM is imported: the table is installed with it
    warnings = _capture_warnings()
    from vllm.engine.arg_utils import EngineArgs

    parser = _vllm_parser()
    parser.add_argument("model_tag", nargs="?", default=None)
    EngineArgs.add_cli_args(parser)
    namespace = parser.parse_args(argv)
    if namespace.model_tag is not None:
        namespace.model = namespace.model_tag
    if getattr(namespace, "device", None) is None:
        namespace.device = settings.HETEROGENEOUS
    if namespace.model and os.sep in namespace.model and not os.path.exists(namespace.model):
        raise _OneLineError(f"model path {namespace.model!r} does not exist")
    try:
        engine_args = EngineArgs.from_cli_args(namespace)
        config = engine_args.create_engine_config()
    except (HeteroShimError, ValueError, TypeError, OSError, RuntimeError) as exc:
        raise _OneLineError(one_line(exc)) from None
    state = hetero_shim.status()
    print(state["plan"] or "hetero_shim: no plan was made (heterogeneous mode is off)")
    print(f"  vLLM: {state['vllm']}, patch table {state['table']}")
    print(f"  GPU memory: {_gpu_memory(config)}")
    if state["cpu_kernels"]:
        print(f"  CPU kernels: {state['cpu_kernels']}")
    for variable in ("VLLM_PP_LAYER_PARTITION",):
        if variable in state["environment_set"]:
            print(f"  sets {variable}={os.environ.get(variable)} for the workers")
    if warnings:
        print("warnings:")
        for line in dict.fromkeys(warnings):
            print(f"  {line}")
    return 0


def _vllm_parser():
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older layouts
        from vllm.utils import FlexibleArgumentParser

    class OneLineParser(FlexibleArgumentParser):
        def error(self, message):  # argparse prints usage and exits 2; one line instead
            raise _OneLineError(message)

    return OneLineParser(prog=f"{PROG} plan", add_help=False)


def _capture_warnings() -> list[str]:
    """Warnings that vLLM and the shim log while the plan is made (vLLM's logging stays unconfigured)."""
    import logging

    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            try:
                found.append(" ".join(record.getMessage().split()))
            except Exception:  # noqa: BLE001, S110 - a record that cannot be formatted is not a plan
                pass

    logger = logging.getLogger("vllm")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    return found


def _gpu_memory(config) -> str:
    from hetero_shim import run_state

    plan = run_state.plan()
    if plan is None or plan.gpu_ranks == 0:
        return "none (no GPU ranks: every rank runs on CPU cores)"
    from vllm.platforms import current_platform

    cache = config.cache_config
    total = current_platform.get_device_total_memory(0)
    gib = 1 << 30
    text = (f"each of the {plan.gpu_ranks} GPU rank(s) takes up to gpu_memory_utilization {cache.gpu_memory_utilization}"
            f" x {total / gib:.1f} GiB = {cache.gpu_memory_utilization * total / gib:.1f} GiB, as stock vLLM")
    if getattr(cache, "kv_cache_memory_bytes", None):
        text += f"; its KV cache is kv_cache_memory_bytes={cache.kv_cache_memory_bytes / gib:.2f} GiB"
    if plan.pp_size > 1:
        from hetero_shim.planning.layer_costs import cpu_ranks_on_each_gpu, gpu_layer_costs

        tp = plan.world_size // plan.pp_size
        own, served = cpu_ranks_on_each_gpu(tuple(plan.kind(stage * tp) for stage in range(plan.pp_size)))
        costs = gpu_layer_costs(config, total, cpu_ranks_on_gpu=own, served_on_gpu=served)
        text += f"; GPU stage: {costs.describe()}"
    return text


def one_line(exc: BaseException) -> str:
    """An error as one line: pydantic's validation errors by their messages, others squeezed."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            messages = [str(e.get("msg", "")).removeprefix("Value error, ") for e in errors()]
            if any(messages):
                return "; ".join(m for m in messages if m)
        except Exception:  # noqa: BLE001, S110 - not pydantic's errors(): fall back to the text
            pass
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information visit")]
    return " ".join(lines) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
