"""Scripts that build their engine outside a __main__ guard (spawn runs them again)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from hetero_shim import main_guard

SOURCE = textwrap.dedent('''\
    import os
    llm = make()                      # line 2: unguarded
    def f():
        return make()                 # line 4: inside a function (its caller decides)
    if __name__ == "__main__":
        llm = make()                  # line 6: guarded
    if "__main__" == __name__:
        llm = make()                  # line 8: guarded, the other way round
    if __name__ != "__main__":
        llm = make()                  # line 10: not a main guard
''')


def test_statements_inside_a_main_guard():
    assert not main_guard.statement_is_guarded(SOURCE, 2)
    assert main_guard.statement_is_guarded(SOURCE, 6)
    assert main_guard.statement_is_guarded(SOURCE, 8)
    assert not main_guard.statement_is_guarded(SOURCE, 10)


def test_detection_in_a_real_script(tmp_path):
    """The caller's <module> frame of __main__ decides, through function calls."""
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent('''\
        from hetero_shim import main_guard
        def build():
            return main_guard.engine_built_unguarded()
        print("top", build())
        if __name__ == "__main__":
            print("guarded", build())
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert "top True" in out and "guarded False" in out


def test_python_c_is_never_run_again_by_spawn():
    code = "from hetero_shim import main_guard; print(main_guard.engine_built_unguarded())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_main_hidden_restores_the_main_module():
    main = sys.modules["__main__"]
    with main_guard.main_hidden(True):
        assert sys.modules["__main__"] is not main and not hasattr(sys.modules["__main__"], "__file__")
    assert sys.modules["__main__"] is main
    with main_guard.main_hidden(False):
        assert sys.modules["__main__"] is main
