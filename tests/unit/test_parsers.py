"""Property-based tests (hypothesis) for every parser of options, settings and bind lists:
each either returns a well-formed value or raises HeteroConfigError with a one-line message
that names what was wrong; nothing else escapes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hetero_shim import settings
from hetero_shim.errors import HeteroConfigError
from hetero_shim.planning.plan import format_id_list, parse_bind_list, parse_id_list

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)  # what an environment can hold
ID_TEXT = st.text(alphabet="0123456789-, |abx+", max_size=16)


def environ(**values: str):
    return settings.environ_set(values)


def one_line_error(call, *names: str):
    try:
        return call()
    except HeteroConfigError as exc:
        message = str(exc)
        assert "\n" not in message and all(n in message for n in names), message
        return exc


@given(TEXT)
def test_on_off_switches(raw):
    for name, read in ((settings.ENABLE, settings.activation_requested), (settings.VERIFY_TOKENS, settings.verify_tokens)):
        with environ(**{name: raw}):
            got = one_line_error(read, name, repr(raw))
        word = raw.strip().lower()
        if word in {"1", "true", "yes", "on"}:
            assert got is True
        elif word in {"0", "false", "no", "off", ""}:
            assert got is False
        else:
            assert isinstance(got, HeteroConfigError)


@given(TEXT)
def test_device_mode(raw):
    with environ(**{settings.DEVICE: raw}):
        got = one_line_error(settings.device_mode, settings.DEVICE)
    if not raw.strip():
        assert got is None
    elif raw.strip() == "heterogeneous":
        assert got == "heterogeneous"
    else:
        assert isinstance(got, HeteroConfigError) and "'heterogeneous'" in str(got)


@given(st.one_of(TEXT, st.integers(), st.none(), st.booleans()))
def test_device_option(value):
    got = one_line_error(lambda: settings.parse_device(value), "device=")
    assert got == "heterogeneous" if value == "heterogeneous" else isinstance(got, HeteroConfigError)


@given(st.one_of(TEXT, st.integers(-5, 10**6).map(str)))
def test_gpu_rank_override(raw):
    with environ(**{settings.GPU_RANKS: raw}):
        got = one_line_error(settings.gpu_ranks_override, settings.GPU_RANKS)
    if not raw.strip():
        assert got is None
    elif isinstance(got, int):
        assert got >= 0 and got == int(raw.strip())
    else:
        assert isinstance(got, HeteroConfigError)


@pytest.mark.parametrize("name,read,smallest", [
    (settings.HANG_DUMP, settings.hang_dump_seconds, 0),
    (settings.GLOO_TIMEOUT, settings.gloo_timeout_seconds, 1),
])
@given(raw=st.one_of(TEXT, st.integers(-5, 10**7).map(str)))
def test_seconds_settings(name, read, smallest, raw):
    with environ(**{name: raw}):
        got = one_line_error(read, name)
    if isinstance(got, int):
        assert got >= smallest and (not raw.strip() or got == int(raw.strip()))
    else:
        assert isinstance(got, HeteroConfigError)


@given(TEXT)
def test_collectives_mode(raw):
    with environ(**{settings.COLLECTIVES: raw}):
        got = one_line_error(settings.collectives_mode, settings.COLLECTIVES)
    if isinstance(got, str):
        assert got in settings.COLLECTIVE_MODES and got == (raw.strip().lower() or "auto")
    else:
        assert isinstance(got, HeteroConfigError) and "auto, shm, gloo" in str(got)


@given(st.one_of(TEXT, st.floats(allow_nan=True).map(str)))
def test_shared_memory_numbers(raw):
    with environ(**{settings.SHM_TIMEOUT: raw, settings.SHM_SLOT_MB: raw}):
        timeout = one_line_error(settings.shm_timeout_seconds, settings.SHM_TIMEOUT)
        slot = one_line_error(settings.shm_slot_bytes, settings.SHM_SLOT_MB)
    assert isinstance(timeout, HeteroConfigError) or timeout > 0
    unset = slot is None and not raw.strip()  # then the group-size default applies
    assert isinstance(slot, HeteroConfigError) or unset or (slot >= 4096 and slot % 4096 == 0)


def test_gloo_timeout_default_and_zero():
    with environ(**{settings.GLOO_TIMEOUT: ""}):
        assert settings.gloo_timeout_seconds() == settings.GLOO_TIMEOUT_DEFAULT_S
    with environ(**{settings.GLOO_TIMEOUT: "0"}), pytest.raises(HeteroConfigError, match="1 or more"):
        settings.gloo_timeout_seconds()


@given(st.lists(st.integers(0, 4096), max_size=40))
def test_id_list_round_trip(ids):
    text = format_id_list(ids)
    assert parse_id_list(text) == sorted(ids) if ids else text == ""
    assert " " not in text and all(part for part in text.split(",") if text)


@given(ID_TEXT)
def test_id_list_parser_never_crashes(text):
    got = one_line_error(lambda: parse_id_list(text), repr(text))
    if isinstance(got, list):
        assert got and all(isinstance(i, int) and i >= 0 for i in got)


@hsettings(max_examples=300)
@given(ID_TEXT, st.integers(0, 4), st.sets(st.integers(0, 15), max_size=16))
def test_bind_list_parser(text, cpu_ranks, allowed):
    got = one_line_error(lambda: parse_bind_list(text, cpu_ranks, sorted(allowed)), "")
    if got is None:
        assert text.strip() in ("auto", "nobind")
    elif isinstance(got, list):
        assert len(got) == cpu_ranks
        flat = [i for cores in got for i in set(cores)]
        assert set(flat) <= allowed and len(flat) == len(set(flat))  # only allowed cores, none given twice
    else:
        assert isinstance(got, HeteroConfigError)
        assert "VLLM_CPU_OMP_THREADS_BIND" in str(got) or "CPU list" in str(got)


@given(st.dictionaries(st.sampled_from([settings.ENABLE, settings.DEVICE, settings.GPU_RANKS, settings.HANG_DUMP,
                                        settings.VERIFY_TOKENS, settings.GLOO_TIMEOUT, settings.COLLECTIVES,
                                        settings.SHM_TIMEOUT, settings.SHM_SLOT_MB, settings.SHM_STREAM_OPS,
                                        settings.SHM_FUSED_KERNEL]),
                       TEXT, max_size=4))
def test_check_environment_names_the_bad_setting(values):
    with environ(**values):
        got = one_line_error(settings.check_environment)
    if isinstance(got, HeteroConfigError):
        assert any(f"{name}=" in str(got) for name in values), str(got)


ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@given(st.one_of(st.just([]), st.lists(ARG, min_size=1, max_size=5),
                st.lists(st.sampled_from(["-h", "--help", "--version", "-V", "python", "--", "-"]), min_size=1, max_size=3)))
def test_launcher_command_line(argv):
    """python -m hetero_shim ARGV: usage for nothing/-h, the version for --version/-V, 127 for an
    unknown command, otherwise exec of exactly the given command and arguments (python meaning the
    launcher's interpreter)."""
    import sys

    from hetero_shim import __main__ as launcher

    calls = []
    real_exec = os.execvp
    os.execvp = lambda file, args: calls.append((file, args))
    try:
        with environ(HETERO_SHIM_VLLM_TABLE="0.32.0", PYTHONPATH=os.environ.get("PYTHONPATH", ""),
                     HETERO_SHIM_ENABLE=os.environ.get("HETERO_SHIM_ENABLE", "0")):
            code = launcher.main(list(argv))
    finally:
        os.execvp = real_exec
    if not argv or argv[0] in ("-h", "--help", "--version", "-V"):
        assert code == (2 if not argv else 0) and not calls
    elif calls:
        (file, args), = calls
        assert args[1:] == argv[1:]
        assert file == (sys.executable if argv[0] in ("python", "python3") else file)
    else:
        assert code == 127


@pytest.mark.parametrize("name,raw", [(settings.ENABLE, "maybe"), (settings.GPU_RANKS, "x"),
                                      (settings.GLOO_TIMEOUT, "soon"), (settings.DEVICE, "gpu")])
def test_launcher_refuses_a_bad_setting_with_exit_2(name, raw, capsys):
    from hetero_shim import __main__ as launcher

    with environ(**{name: raw, "HETERO_SHIM_VLLM_TABLE": "0.32.0"}):
        assert launcher.main(["python", "-c", "pass"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetero_shim: ") and f"{name}={raw!r}" in err and "\n" not in err
