"""Beside other distributions named `kernels` and `adapters` (Hugging Face's, AdapterHub's): every
process of the engine imports this project's packages, from any working directory, and a wheel of
this project never replaces another distribution's files (engine/own_packages.py, setup.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.own_packages import NAMES, location

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "bench", "kernels", "adapters")
FAKE = "raise ImportError('the other project\\'s {name} was imported')\n"


def fake_distributions(site: Path, names=NAMES) -> dict[str, bytes]:
    """Distributions of other projects under our package names, as pip leaves them in `site`:
    a package whose import fails loudly, its dist-info with RECORD and top_level.txt. Returns the
    bytes of each package's __init__.py (what 'never replaced' compares)."""
    written = {}
    for name in names:
        package = site / name
        package.mkdir(parents=True, exist_ok=True)
        init = FAKE.format(name=name).encode()
        (package / "__init__.py").write_bytes(init)
        info = site / f"{name}-9.9.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
        (info / "top_level.txt").write_text(f"{name}\n")
        (info / "RECORD").write_text(f"{name}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
        written[name] = init
    return written


def python(args: list[str], cwd: Path, path: list[Path] = ()) -> subprocess.CompletedProcess:
    """This interpreter in a working directory that is not the clone, `path` first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# every module of the four packages, imported; then where kernels and adapters came from
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import engine
import bench, kernels, adapters
names = []
for top in ("engine", "bench", "kernels", "adapters"):
    package = sys.modules[top]
    names += [top] + [m.name for m in pkgutil.walk_packages(package.__path__, top + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": len(names), "kernels": kernels.__file__, "adapters": adapters.__file__,
                  "foreign": [n for n in sys.modules if n.split(".")[0] in ("kernels", "adapters")
                              and not sys.modules[n].__file__.startswith(sys.argv[1])]}))
"""


def test_every_module_imports_ours_beside_other_kernels_and_adapters(tmp_path):
    site = tmp_path / "site"
    fake_distributions(site)
    got = python(["-c", IMPORT_ALL, str(ROOT)], cwd=tmp_path, path=[site])
    assert got.returncode == 0, got.stderr[-3000:]
    report = json.loads(got.stdout.splitlines()[-1])
    assert report["kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert report["adapters"] == str(ROOT / "adapters" / "__init__.py")
    assert report["foreign"] == [] and report["modules"] > 60


def test_engine_run_and_export_work_from_another_directory(tmp_path):
    from test_export import make_run

    site = tmp_path / "site"
    fake_distributions(site)
    got = python(["-m", "engine.run", "--dry-run", "--json"], cwd=tmp_path, path=[site])
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout.splitlines()[-1])["trainable_params"] == 25878
    run_dir, _ = make_run(tmp_path, "lora")
    out = tmp_path / "exported" / "merged.safetensors"
    got = python(["-m", "engine.export", str(run_dir), "--merged", str(out)], cwd=tmp_path, path=[site])
    assert got.returncode == 0, got.stderr[-3000:]
    assert out.is_file()


def test_a_process_that_imported_another_kernels_first_is_refused_in_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "kernels.py").write_text("OTHER = True\n")
    got = python(["-c", "import kernels; import engine"], cwd=tmp_path, path=[site])
    assert got.returncode == 1
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: another package named 'kernels' is already imported in this process")
    assert str(site / "kernels.py") in last and str(location("kernels")) in last


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of this project, built from a copy of the source (the clone gets no build/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "tests", ".benchmarks"))
    got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    return next((tmp / "dist").glob("vit_forget_not-*.whl"))


def test_a_wheel_install_keeps_the_other_distributions_files_and_runs_beside_them(wheel, tmp_path):
    target = tmp_path / "site"
    before = fake_distributions(target)
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    for name, init in before.items():  # theirs untouched, ours beside them
        assert (target / name / "__init__.py").read_bytes() == init
        assert (target / "_vit_forget_not" / name / "__init__.py").is_file()
    got = python(["-c", "import engine, kernels, adapters; print(kernels.__file__); print(adapters.__file__)"],
                 cwd=tmp_path, path=[target])
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split() == [str(target / "_vit_forget_not" / n / "__init__.py") for n in NAMES]
    got = python(["-m", "engine.run", "--dry-run", "--json"], cwd=tmp_path, path=[target])
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout.splitlines()[-1])["trainable_params"] == 25878
