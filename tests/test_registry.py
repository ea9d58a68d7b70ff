"""The house: one backend registry that every module asks, packages that show the layers, no import cycle, one
flag vocabulary, typed errors, and a backend added as one module plus one registry entry."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.errors import InputError, ModelFileError, OptionError, ParityError, UserError
from unet_deploy.runtime import registry
from unet_deploy.runtime.registry import REGISTRY, BackendSpec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unet_deploy"
NAMES = {*REGISTRY, *(s.export_format for s in REGISTRY.values() if s.export_format)}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def test_root_keeps_twelve_modules_and_no_module_name_twice() -> None:
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 12, root
    names = Counter(p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__"))
    assert [n for n, count in names.items() if count > 1] == []


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """unet_deploy modules imported when ``path`` is imported (module level, not under TYPE_CHECKING):
    ``from pkg import submodule`` is an edge to the submodule, ``from module import name`` one to the module."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unet_deploy"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("unet_deploy"))
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {m: {i for i in _top_level_imports(p, modules) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def _name_comparisons(path: Path) -> list[int]:
    """Lines comparing a value with a backend or format name (``== "ort"``, ``in ("torch", ...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        words = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
        words += [e.value for s in sides if isinstance(s, (ast.Tuple, ast.Set, ast.List)) for e in s.elts
                  if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if NAMES & set(words):
            lines.append(node.lineno)
    return lines


def test_backend_names_are_compared_only_in_the_runtime_package() -> None:
    outside = {str(p.relative_to(ROOT)): lines for m, p in _modules().items()
               if not m.startswith("unet_deploy.runtime") and (lines := _name_comparisons(p))}
    assert sum(len(v) for v in outside.values()) <= 5, outside


def test_the_scanner_finds_a_planted_comparison(tmp_path: Path) -> None:
    planted = tmp_path / "m.py"
    planted.write_text("def f(b):\n    return 4 if b == 'openvino' else (2 if b in ('ort', 'x') else 1)\n")
    assert _name_comparisons(planted) == [2, 2]


def test_lazy_packages_export_real_names_without_loading_torch() -> None:
    import unet_deploy.export as export_pkg
    import unet_deploy.export.writers as writers
    import unet_deploy.runtime as runtime_pkg
    import unet_deploy.train as train_pkg

    assert sorted(export_pkg.__all__) == sorted(writers.__all__)
    for pkg in (export_pkg, runtime_pkg, train_pkg):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, (pkg.__name__, name)
        with pytest.raises(AttributeError):
            pkg.no_such_name  # noqa: B018
    code = ("import sys, unet_deploy.runtime, unet_deploy.train, unet_deploy.export, unet_deploy.cli\n"
            "from unet_deploy.runtime import load_backend, REGISTRY\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


FAKE_BACKEND = '''
"""A backend added as one module: it runs a checkpoint named in a .echo text file on eager torch."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from unet_deploy.runtime.torch_backend import load_torch, read_checkpoint_config
from unet_deploy.runtime.backend_options import TorchOptions

@dataclass(frozen=True)
class EchoOptions:
    backend: ClassVar[str] = "echo"
    threads: int | None = None

def load_echo(path, device, options):
    loaded = load_torch(Path(Path(path).read_text().strip()), device, TorchOptions())
    loaded.name, loaded.path, loaded.provider = "echo", Path(path), "echo on " + loaded.provider
    return loaded

def read_echo_config(path):
    return read_checkpoint_config(Path(Path(path).read_text().strip()))
'''


@pytest.fixture
def echo_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fake backend's module on sys.path and its one registry entry."""
    (tmp_path / "echo_backend.py").write_text(textwrap.dedent(FAKE_BACKEND))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__("echo_backend")
    entry = BackendSpec("echo", "echo", (".echo",), module.EchoOptions, "echo_backend:load_echo",
                        "echo_backend:read_echo_config", ("fp32",), takes_threads=True)
    remove = registry.register(entry)
    yield entry
    remove()
    sys.modules.pop("echo_backend", None)


def test_a_new_backend_is_one_module_and_one_registry_entry(echo_backend, tmp_path: Path, trained_model) -> None:
    """Registered, it loads by suffix, predicts the masks eager torch predicts, and the CLI runs it."""
    from unet_deploy.api import Predictor
    from unet_deploy.cli import main
    from unet_deploy.runtime.cpu_share import share_cores

    model = tmp_path / "model.echo"
    model.write_text(str(trained_model))
    image = tmp_path / "car.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 144, 3), dtype=np.uint8)).save(image)
    echo = Predictor.load(model, device="cpu")
    assert echo.describe()["backend"] == "echo"
    assert np.array_equal(echo.predict(image), Predictor.load(trained_model, device="cpu").predict(image))
    assert share_cores("echo", "cpu", 64, None) == 1  # its entry takes threads: a share, as ONNX Runtime's
    with pytest.raises(SystemExit) as done:
        main(["predict", "-m", str(model), str(image), "-o", str(tmp_path / "out.png"), "-q", "--verbose"])
    assert done.value.code in (0, None) and (tmp_path / "out.png").is_file()
    with pytest.raises(ValueError, match="exist already"):
        registry.register(echo_backend)


@pytest.fixture
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint (random weights are enough: both paths run the same weights)."""
    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.config import DeployConfig, ModelConfig

    path = tmp_path_factory.mktemp("echo") / "tiny.pth"
    config = DeployConfig(model=ModelConfig(base_channels=4))
    save_checkpoint(path, config.model.build().eval(), config, {})
    return path


def test_each_process_gets_its_share_of_the_cores_on_every_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """predict --nproc N and serve --workers N: ONNX Runtime and OpenVINO get cores/N threads, torch sets its
    own pool to cores/N; one process or --threads keeps what was given."""
    import torch

    from unet_deploy.runtime import cpu_share

    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 8)
    assert cpu_share.share_cores("ort", "cpu", 2, None) == 4
    assert cpu_share.share_cores("openvino", "cpu", 4, None) == 2
    assert cpu_share.share_cores("openvino", "cpu", 1, None) is None
    assert cpu_share.share_cores("ort", "cpu", 2, 3) == 3
    assert cpu_share.share_cores("ort", "cuda:0", 2, None) is None
    before = torch.get_num_threads()
    try:
        assert cpu_share.share_cores("torch", "cpu", 4, None) is None and torch.get_num_threads() == 2
        assert cpu_share.share_cores("torchscript", "cpu", 8, None) is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_verbose_says_which_cpus_and_threads(capsys: pytest.CaptureFixture[str]) -> None:
    from unet_deploy.cli._options import say_threads
    from unet_deploy.runtime.cpu_share import usable_cpus

    say_threads(False)
    assert capsys.readouterr().err == ""
    say_threads(True, processes=2, crf_workers=1)
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"threads: {usable_cpus()} usable CPU(s) (affinity ") and "cgroup quota" in line
    assert "2 processes" in line and "CRF workers 1" in line and len(line.splitlines()) == 1


def test_openmp_threads_sleep_on_a_busy_machine_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from unet_deploy.runtime import cpu_share

    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cpu_share, "free_cpus_since", lambda start: 1.8)
    assert not cpu_share.passive_threads_when_busy() and "OMP_WAIT_POLICY" not in os.environ
    assert "spin briefly (1.8 of 2 CPUs free at start)" in cpu_share.thread_report()
    monkeypatch.setattr(cpu_share, "free_cpus_since", lambda start: 0.7)
    assert cpu_share.passive_threads_when_busy() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "threads sleep (0.7 of 2 CPUs free at start)" in cpu_share.thread_report()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not cpu_share.passive_threads_when_busy() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "(OMP_WAIT_POLICY set)" in cpu_share.thread_report()


def test_the_cli_sees_a_busy_cpu_at_once_and_lets_openmp_threads_sleep() -> None:
    """A real busy loop on CPU 0 and the CLI pinned there: the moment's reading says busy (the load average
    would take a minute to rise)."""
    busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        code = ("import os; from unet_deploy.runtime.cpu_share import IMPORTED, free_cpus_since, "
                "passive_threads_when_busy as p; print(free_cpus_since(IMPORTED), p(IMPORTED), "
                "os.environ['OMP_WAIT_POLICY'])")
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60)
    finally:
        busy.kill()
        busy.wait()
    assert out.returncode == 0, out.stderr
    free, passive, policy = out.stdout.split()
    assert float(free) < 0.5 and passive == "True" and policy == "PASSIVE", out.stdout


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not (CPU_CGROUP / "cpu.cfs_quota_us").exists() or not os.access(CPU_CGROUP, os.W_OK),
                    reason="needs a writable cgroup v1 cpu controller (root in this container)")
def test_a_process_under_a_one_cpu_quota_uses_one_thread() -> None:
    """A real cgroup with a 1-CPU quota: usable_cpus() is 1 there, and ONNX Runtime and torch take 1 thread."""
    group = CPU_CGROUP / f"unet-deploy-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        code = ("import os, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
                "from unet_deploy.runtime.cpu_share import usable_cpus, limit_torch_threads\n"
                "from unet_deploy.runtime.ort_session import ort_session_options\n"
                "print(usable_cpus(), limit_torch_threads(), ort_session_options().intra_op_num_threads)")
        wrapper = f"echo $$ > {group / 'tasks'} && exec {sys.executable} -c \"$0\" /dev/null"
        out = subprocess.run(["bash", "-c", wrapper, code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "1", "1"]
    finally:
        group.rmdir()


def test_usable_cpus_reads_the_cgroup_quota(tmp_path: Path) -> None:
    from unet_deploy.runtime.cpu_share import cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 2.0
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_unknown_names_suggest_the_closest() -> None:
    from unet_deploy.export.exporter import parse_formats
    from unet_deploy.runtime.backend_options import TorchOptions
    from unet_deploy.runtime.registry import spec

    with pytest.raises(OptionError, match=r"^--backend opnevino: unknown backend \(did you mean openvino\?\)"):
        spec("opnevino")
    with pytest.raises(OptionError, match=r"^--format onxx: unknown format \(did you mean onnx\?\)"):
        parse_formats("onxx")
    with pytest.raises(OptionError, match=r"^--precision bf61: unknown precision \(did you mean bf16\?\)"):
        TorchOptions(precision="bf61")


def test_typed_errors_tell_bad_input_from_a_failed_check(tmp_path: Path) -> None:
    from unet_deploy.api import Predictor
    from unet_deploy.export.exporter import ExportResult
    from unet_deploy.images.image_io import load_image

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(InputError):
        load_image(broken)
    with pytest.raises(ModelFileError, match="model file not found"):
        Predictor.load(tmp_path / "missing.onnx")
    failed = ExportResult(tmp_path / "m.pth", failed=["openvino"])
    with pytest.raises(ParityError, match="^openvino: parity check failed") as caught:
        failed.raise_for_failures()
    assert caught.value.exit_code == 1 and isinstance(caught.value, UserError)
    ExportResult(tmp_path / "m.pth").raise_for_failures()  # nothing failed: nothing raised


@pytest.mark.parametrize(("argv", "long"), [(["benchmark", "-b", "ort"], "--backends"),
                                            (["export", "-f", "onnx"], "--format"), (["synth", "-n5"], "--n=5")])
def test_old_short_flags_still_work_with_one_deprecation_line(argv, long, capsys) -> None:
    from unet_deploy.cli._options import rewrite_deprecated

    rewritten = rewrite_deprecated(argv)
    assert long in rewritten and argv[1] not in rewritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0]
    assert rewrite_deprecated(["predict", "-b", "2", "-n", "--", "-f"]) == ["predict", "-b", "2", "-n", "--", "-f"]


def test_a_short_flag_means_one_thing_in_every_command() -> None:
    import typer

    from unet_deploy.cli import app

    meaning: dict[str, set[str]] = {}
    for command in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("-") and not opt.startswith("--"):
                    meaning.setdefault(opt, set()).add(param.name)
    # Pytorch-UNet's own scripts give -v two meanings (train.py --validation, predict.py --viz): kept for them
    twice = {flag: names for flag, names in meaning.items() if len(names) > 1 and flag != "-v"}
    allowed = {"-s": {"scale", "scales"}, "-t": {"mask_threshold", "threshold"}, "-o": {"out", "output", "work_dir"}}
    assert {f: n for f, n in twice.items() if not n <= allowed.get(f, set())} == {}
