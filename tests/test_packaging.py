"""Packaging: the wheel ships `wanjax`, `wanjax.quant`, `wanjax.kernels`, the mini model and the LICENSE (and no
top-level `quant`/`kernels`); the core install needs no torch / matplotlib; `make demo` installs the core only."""

import email
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINI = ROOT / "models" / "mini"
WHEEL_LIMIT = 60e6
# importable only from the extras (test / train / eval): core code must not import them at module level
OPTIONAL = ("torch", "matplotlib", "diffusers", "transformers", "sentencepiece", "pytest")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (the build writes build/ and *.egg-info next to pyproject.toml)."""
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("wanjax", "quant", "kernels", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path_factory.mktemp("whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        cwd=src,
    )
    (whl,) = out.glob("wanjax-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contents(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in (
        "wanjax/__init__.py",
        "wanjax/quant/__init__.py",
        "wanjax/kernels/__init__.py",
        "wanjax/model/dit.py",
        "wanjax/io/dit_loader.py",
        "wanjax/io/pth.py",
        "wanjax/sampling/unipc.py",
        "wanjax/mini.py",
    ):
        assert pkg in names, pkg
    # every package of the source tree is in the wheel (a non-editable install must not lose subpackages)
    for init in sorted((ROOT / "wanjax").rglob("__init__.py")):
        rel = "wanjax/" + init.relative_to(ROOT / "wanjax").as_posix()
        assert rel in names, f"package {rel} missing from the wheel"
    for f in sorted((ROOT / "wanjax" / "evaluation" / "sets").glob("*.json")):
        assert f"wanjax/evaluation/sets/{f.name}" in names
    # the mini model: every file of models/mini, under wanjax/assets/mini
    model_files = sorted(p.relative_to(MINI).as_posix() for p in MINI.rglob("*") if p.is_file())
    assert len(model_files) >= 12 and "Wan2.1_VAE.pth" in model_files
    for rel in model_files:
        assert f"wanjax/assets/mini/{rel}" in names, f"models/mini/{rel} missing from the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"
    assert wheel.stat().st_size < WHEEL_LIMIT, wheel.stat().st_size
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"wanjax"}, tops
    # the wheel imports on its own (zip import; wanjax.config needs no third-party package)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import wanjax, wanjax.quant, wanjax.kernels; "
        "assert wanjax.__file__.startswith(sys.argv[1]), wanjax.__file__"
    )
    subprocess.run([sys.executable, "-c", code, str(wheel)], check=True, cwd=tmp_path)


def _requires(meta) -> tuple[set[str], dict[str, set[str]]]:
    core, extras = set(), {}
    for r in meta.get_all("Requires-Dist"):
        name = r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        if "extra ==" in r:
            extras.setdefault(r.split("extra ==")[1].strip().strip("'\""), set()).add(name)
        else:
            core.add(name)
    return core, extras


@pytest.mark.slow
def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        (mname,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(mname))
    assert meta["Requires-Python"] == ">=3.12"
    assert meta["License-Expression"] == "Apache-2.0"
    core, extras = _requires(meta)
    assert {"jax", "flax", "pillow", "imageio", "imageio-ffmpeg", "safetensors", "ml_dtypes"} <= core, core
    assert not core & {"torch", "optax", "matplotlib", "diffusers", "transformers"}, core
    assert "optax" in extras["train"] and "matplotlib" in extras["eval"]
    assert {"torch", "diffusers", "transformers", "wanjax"} <= extras["test"]


@pytest.mark.slow
def test_installed_wheel_finds_and_loads_the_mini_model(wheel, tmp_path):
    """Unpacked as pip installs it (no source tree next to it), the wheel finds its mini model and loads the
    pipeline from it, and every module that generate / quantize / eval / the demo import imports, with torch,
    matplotlib and the test packages unimportable."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    mods = [
        "wanjax.cli",
        "wanjax.demo",
        "wanjax.pipeline",
        "wanjax.io.t5_loader",
        "wanjax.io.vae_loader",
        "wanjax.evaluation.run",
        "wanjax.evaluation.plots",
        "wanjax.train.evaluate",
        "wanjax.train.report",
    ]
    mods += ["wanjax.quant." + p.stem for p in sorted((ROOT / "quant").glob("*.py")) if p.stem != "__init__"]
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError(f"{{name}} is blocked: not a core dependency")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import wanjax, wanjax.mini
p = wanjax.mini.mini_model_path()
assert p.startswith(sys.argv[1]) and p.endswith("assets/mini"), p
for m in {mods!r}:
    assert importlib.import_module(m).__file__.startswith(sys.argv[1]), m
from wanjax.pipeline import WanI2VPipeline
pipe = WanI2VPipeline.from_pretrained(p)
print("ok", type(pipe).__name__)
"""
    r = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "WANJAX_MINI_MODEL": ""},
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_mini_model_path(monkeypatch, tmp_path):
    from wanjax.mini import MINI_MODEL_ENV, mini_model_path

    monkeypatch.delenv(MINI_MODEL_ENV, raising=False)
    assert pathlib.Path(mini_model_path()).resolve() == MINI.resolve()  # the checkout's models/mini
    monkeypatch.setenv(MINI_MODEL_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no mini model there"):
        mini_model_path()
    monkeypatch.setenv(MINI_MODEL_ENV, str(MINI))
    assert mini_model_path() == str(MINI)


def test_extras_and_make_targets():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["requires-python"] == ">=3.12" and (ROOT / "LICENSE").read_text().count("Apache License") >= 1
    core = " ".join(proj["dependencies"]).lower()
    assert "torch" not in core and "optax" not in core and "matplotlib" not in core
    pins = {
        line.split("==")[0].lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for dep in proj["dependencies"] + [d for v in proj["optional-dependencies"].values() for d in v]:
        name = dep.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name == "wanjax" or name in pins or dep.startswith("jax["), f"{name} is not pinned in constraints.txt"

    # `make demo` installs the core only; `make test` adds the test extras
    def dry(target):
        r = subprocess.run(
            ["make", "-n", target, "VENV=/nonexistent/venv", "PYTHON=python3.12"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return [line for line in r.stdout.splitlines() if "pip install" in line and "-c constraints.txt" in line]

    demo, test = dry("demo"), dry("test")
    assert len(demo) == 1 and demo[0].endswith("-e .") and "[" not in demo[0], demo
    assert len(test) == 2 and test[0] == demo[0] and test[1].endswith('-e ".[test]"'), test


def test_installed_import_names(tmp_path):
    """Outside the repo root (whose folders are on sys.path only there), only the wanjax.* names exist."""
    code = (
        "import importlib.util as u, wanjax.quant, wanjax.kernels; "
        "assert u.find_spec('kernels') is None and u.find_spec('quant') is None; "
        "assert wanjax.quant.__name__ == 'wanjax.quant'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_mini_model_card_metadata():
    import yaml

    text = (MINI / "README.md").read_text()
    assert text.startswith("---\n"), "models/mini/README.md must open with YAML metadata"
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "wanjax"
    assert meta["pipeline_tag"] == "image-to-video" and "wan2.2" in meta["tags"]
    gen = __import__("json").loads((MINI / "generation_config.json").read_text())
    assert f"{gen['num_frames']} frames" in text and gen["max_area"] in text  # the card states the settings
