"""The `hetero-shim` command without vLLM: --version, the help of each subcommand lists every
setting settings.py documents, status, the launcher behind `run` and a bare command, one-line errors.
(`plan` needs vLLM's config: tests/integration/test_plugin.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import procs
import pytest

from hetero_shim import __version__, cli, settings


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"hetero_shim {__version__}\n"


def test_documented_settings_come_from_settings_py():
    documented = dict(cli.documented_settings())
    assert documented[settings.DEVICE].startswith('"heterogeneous" puts vLLM into heterogeneous mode')
    for name in (settings.ENABLE, settings.GPU_RANKS, settings.FORCE_TABLE, settings.OMP_BIND,
                 settings.CPU_KVCACHE_SPACE, settings.CONFINE):
        assert documented.get(name), name
    assert all(doc and "\n" not in doc for doc in documented.values())


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["status", "--help"], ["run", "--help"]])
def test_every_help_lists_the_settings(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "settings (environment variables" in out
    for name, _doc in cli.documented_settings():
        assert f"\n  {name}\n" in out, name


def test_no_arguments_and_unknown_options_exit_2(capsys):
    assert cli.main([]) == 2
    assert "usage: hetero-shim" in capsys.readouterr().err
    assert cli.main(["--frobnicate"]) == 2
    assert "unknown option '--frobnicate'" in capsys.readouterr().err


def test_status_lists_release_patches_and_settings(capsys, monkeypatch):
    monkeypatch.setenv(settings.GPU_RANKS, "0")
    code = cli.main(["status"])
    out = capsys.readouterr().out
    assert out.startswith(f"hetero_shim {__version__}\nvLLM: ")
    assert f"  {settings.GPU_RANKS}=0\n" in out and f"  {settings.FORCE_TABLE} (unset)\n" in out
    if code == 0:  # a supported vLLM is installed (the CI venv): its table's rows
        assert "what is patched (table " in out and "EngineArgs.create_engine_config" in out
        assert "why: " in out and "remove when: " in out
    else:
        assert code == 2 and "patch table: none." in out


def test_status_refuses_a_bad_setting(capsys, monkeypatch):
    monkeypatch.setenv(settings.GPU_RANKS, "-3")
    assert cli.main(["status"]) == 2
    assert "HETERO_SHIM_GPU_RANKS='-3'" in capsys.readouterr().err


def test_run_and_a_bare_command_are_the_launcher(monkeypatch):
    calls = []
    import hetero_shim.__main__ as launcher

    monkeypatch.setattr(launcher, "main", lambda argv: calls.append(argv) or 0)
    assert cli.main(["run", "python", "-c", "pass"]) == 0
    assert cli.main(["vllm", "serve", "m"]) == 0
    assert calls == [["python", "-c", "pass"], ["vllm", "serve", "m"]]


def test_one_line_errors():
    class Fake(ValueError):
        def errors(self):
            return [{"msg": "Value error, heads (4) not divisible by 3"}, {"msg": "second"}]

    assert cli.one_line(Fake("1 validation error\n  long text\nFor further information visit x")) == (
        "heads (4) not divisible by 3; second")
    assert cli.one_line(OSError("first\n\n  second  ")) == "first second"
    assert cli.one_line(RuntimeError("")) == "RuntimeError"


def test_console_script_and_module_entry(tmp_path):
    """`python -m hetero_shim.cli` works without the console script; `python -m hetero_shim --version` too."""
    env = procs.python_env()
    for args in (["-m", "hetero_shim.cli", "--version"], ["-m", "hetero_shim", "--version"]):
        out = subprocess.run([sys.executable, *args], check=False, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout == f"hetero_shim {__version__}\n", (args, out)
    script = os.path.join(os.path.dirname(sys.executable), "hetero-shim")
    if os.path.exists(script):  # installed (pip install -e . in scripts/setup.sh)
        out = subprocess.run([script, "--version"], check=False, env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout == f"hetero_shim {__version__}\n", out
