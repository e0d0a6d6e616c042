"""python -m hetero_shim CMD [ARGS...]: run any command with the shim active in it and in
every process it starts (``vllm serve ... --device heterogeneous``,
``python -m vllm.entrypoints.openai.api_server ...``, ``python script.py``).

The launcher checks the vLLM release first (an unsupported one is refused here, with
exit status 2), switches HETERO_SHIM_ENABLE on, puts the bootstrap sitecustomize on
PYTHONPATH and replaces itself with the command. Once hetero_shim is installed vLLM's own
commands need no launcher (``hetero_shim.plugin``); it remains for any other command, and
works where vLLM's plugins are filtered out (``VLLM_PLUGINS``). ``hetero-shim`` (hetero_shim/cli.py)
is the command with subcommands (plan, status, run).
"""

from __future__ import annotations

import os
import shutil
import sys

USAGE = "usage: python -m hetero_shim COMMAND [ARGS...]   e.g. python -m hetero_shim vllm serve MODEL --device heterogeneous --tensor-parallel-size 2"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from hetero_shim import __version__

        print(f"hetero_shim {__version__}")
        return 0
    from hetero_shim import _api, settings, versions
    from hetero_shim.errors import HeteroShimError

    try:
        settings.check_environment()
        versions.choose_table(versions.SUPPORTED)
    except HeteroShimError as exc:
        print(f"hetero_shim: {exc}", file=sys.stderr)
        return 2
    if settings.ENABLE in os.environ and not settings.activation_requested():
        print(f"hetero_shim: note: {settings.ENABLE}=0 was overridden by the launcher", file=sys.stderr)
    filtered = _api.plugins_filtered_out()
    if filtered is not None:
        print(f"hetero_shim: note: {_api.plugins_filtered_message(filtered)} (the launcher works regardless)",
              file=sys.stderr)
    _api._propagate_to_children()
    command = argv[0]
    if command in ("python", "python3"):  # the interpreter the launcher runs in, as users expect
        command = sys.executable
    beside = os.path.join(os.path.dirname(sys.executable), command)
    if shutil.which(command) is None and os.access(beside, os.X_OK):
        command = beside  # e.g. `vllm` of a virtualenv that is not activated
    if shutil.which(command) is None and not os.path.exists(command):
        print(f"hetero_shim: command not found: {command}", file=sys.stderr)
        return 127
    os.execvp(command, [command, *argv[1:]])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
