"""transformers' own common test suites, from the INSTALLED transformers' test sources (nothing vendored).

`load_suites()` returns the `test_modeling_common`, `test_configuration_common`, `test_processing_common` and
`generation.test_utils` modules of the installed version, imported as one package (relative imports work),
or raises `SuitesUnavailable` with the reason the caller skips with.

Where the sources come from, first match:
1. `TRANSFORMERS_TESTS_DIR`: the `tests/` folder of a transformers source checkout at the installed version
   (the only way to get the real `GenerationTesterMixin`: `tests/generation/` is not in the sdist).
2. the cache, `$LLAMA_OMNI_CACHE/transformers-tests/<version>/tests` (default `~/.cache/llama-omni-hf`).
3. the PyPI sdist of the installed version (`pip download --no-binary :all:`, ~10 MB), whose `tests/` is
   extracted into the cache.

The sdist lacks some modules the suites import; each gets the smallest stand-in, written into the package,
never into the sources:
- `exporters/test_export.py`: `ExportTesterMixin` whose one test skips (the export suite is not there).
- `generation/test_utils.py`: `GenerationTesterMixin` whose one test skips with `GENERATION_MISSING`.
- `utils/test_configuration_utils.py`: `config_common_kwargs = {}`; `ConfigTester` reads it only in
  `check_config_arguments_init`, which returns before that for composite configs (ours has sub-configs).
- `utils/fetch_hub_objects_for_ci.py` (beside the package, as in the repo): `url_to_local_path` maps the audio
  fixtures' URLs to synthetic local wav files (the real one downloads them), other URLs to themselves.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "hf_transformers_tests"  # not `tests`: site-packages may hold a top-level `tests` package
GENERATION_MISSING = "tests/generation is not in the sdist; set TRANSFORMERS_TESTS_DIR to a source checkout"
EXPORT_MISSING = "tests/exporters is not in the sdist; set TRANSFORMERS_TESTS_DIR to a source checkout"
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")

STAND_INS = {
    ("exporters", "test_export.py"): (
        "import unittest\n\n\n"
        "class ExportTesterMixin:\n"
        "    def test_export_tester_mixin_unavailable(self):\n"
        f"        raise unittest.SkipTest({EXPORT_MISSING!r})\n"
    ),
    ("generation", "test_utils.py"): (
        "import unittest\n\n\n"
        "class GenerationTesterMixin:\n"
        "    def test_generation_tester_mixin_unavailable(self):\n"
        f"        raise unittest.SkipTest({GENERATION_MISSING!r})\n"
    ),
    ("utils", "test_configuration_utils.py"): "config_common_kwargs = {}\n",
}
FETCH_HUB_STAND_IN = '''"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py (not in the sdist),
which downloads the suites' Hub fixtures for offline runs. Audio URLs become local synthetic 16 kHz wav files
(a tone of 1 or 1.5 s) written here, so the audio tests run offline; the content does not matter to them.
Other URLs are returned as they are."""

import os

import numpy as np

AUDIO_SUFFIXES = (".mp3", ".wav", ".flac", ".ogg")


def url_to_local_path(url, *args, **kwargs):
    name = url.rsplit("/", 1)[-1]
    if not name.lower().endswith(AUDIO_SUFFIXES):
        return url
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name.rsplit(".", 1)[0] + ".wav")
    if not os.path.exists(path):
        import soundfile

        seconds = 1.0 + 0.5 * (len(name) % 2)
        t = np.arange(int(16000 * seconds)) / 16000
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return path
'''


class SuitesUnavailable(RuntimeError):
    """The test sources of the installed transformers cannot be had; the message is the skip reason."""


def _cache_root() -> Path:
    base = Path(os.environ.get("LLAMA_OMNI_CACHE", Path.home() / ".cache" / "llama-omni-hf"))
    return base / "transformers-tests"


def _download_sdist_tests(version: str, target: Path) -> None:
    """Extract `tests/` of the transformers-<version> sdist into `target` (atomically: temp dir, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", f"transformers=={version}", "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise SuitesUnavailable(f"downloading the transformers {version} sdist took over 300 s") from None
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SuitesUnavailable(
                f"cannot download the transformers {version} sdist for its test suites (no network? a dev "
                f"version?): {last}. Set TRANSFORMERS_TESTS_DIR to a transformers checkout's tests/ instead"
            )
        prefix = f"transformers-{version}/tests/"
        extracted = Path(tmp) / "extracted"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix) - len("tests/"):]  # -> tests/...
            # the "data" filter refuses links out of the folder and absolute paths (Python >= 3.10.12)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(extracted, members=members, **safe)
        if not all((extracted / "tests" / name).is_file() for name in REQUIRED):
            raise SuitesUnavailable(f"the transformers {version} sdist has no {', '.join(REQUIRED)} under tests/")
        if target.exists():  # another process won the race
            return
        os.replace(extracted / "tests", target)


def _source_tests_dir(version: str) -> Path:
    given = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if given:
        path = Path(given).expanduser().resolve()
        if not all((path / name).is_file() for name in REQUIRED):
            raise SuitesUnavailable(f"TRANSFORMERS_TESTS_DIR={given} has no {', '.join(REQUIRED)}")
        return path
    cached = _cache_root() / version / "tests"
    if not cached.is_dir():
        _download_sdist_tests(version, cached)
    return cached


def _build_package(source: Path) -> tuple[Path, list[str]]:
    """A temp folder holding `hf_transformers_tests/` (symlinks to `source`'s entries, stand-ins where missing)
    and `utils/fetch_hub_objects_for_ci.py` beside it. Returns the folder and the stand-ins used."""
    root = Path(tempfile.mkdtemp(prefix="hf-transformers-tests-"))
    package = root / PACKAGE
    package.mkdir()
    # executed as a module named `transformers` by test_configuration_common's direct_transformers_import: empty
    (package / "__init__.py").write_text("")
    stand_ins = []
    for entry in source.iterdir():
        if entry.name not in ("__init__.py", "__pycache__"):
            (package / entry.name).symlink_to(entry)
    for (subpackage, name), text in STAND_INS.items():
        if (source / subpackage / name).is_file():
            continue
        folder = package / subpackage
        if folder.is_symlink():  # the source has the folder but not this module: copy the folder's links
            folder.unlink()
            folder.mkdir()
            for entry in (source / subpackage).iterdir():
                if entry.name != "__pycache__":
                    (folder / entry.name).symlink_to(entry)
        folder.mkdir(exist_ok=True)
        if not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
        (folder / name).write_text(text)
        stand_ins.append(f"{subpackage}/{name}")
    # test_processing_common does sys.path.append(<tests>/../utils); import fetch_hub_objects_for_ci
    fetch_hub = source.parent / "utils" / "fetch_hub_objects_for_ci.py"
    (root / "utils").mkdir()
    if fetch_hub.is_file():
        (root / "utils" / fetch_hub.name).symlink_to(fetch_hub)
    else:
        (root / "utils" / fetch_hub.name).write_text(FETCH_HUB_STAND_IN)
        stand_ins.append("../utils/fetch_hub_objects_for_ci.py")
    return root, stand_ins


_SUITES = None


class Suites:
    def __init__(self, source: Path, stand_ins: list[str], modules: dict):
        self.source, self.stand_ins = source, stand_ins
        self.__dict__.update(modules)


def load_suites() -> Suites:
    """Import the common suites once per process (see the module docstring)."""
    global _SUITES
    if _SUITES is not None:
        return _SUITES
    try:
        import parameterized  # noqa: F401  (the suites use it)
    except ImportError:
        raise SuitesUnavailable("transformers' common suites need the `parameterized` package") from None
    source = _source_tests_dir(transformers.__version__)
    root, stand_ins = _build_package(source)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    sys.path.insert(0, str(root))
    # the order of a model test file in the transformers repo (generation first, it imports the others)
    names = {"generation_test_utils": "generation.test_utils", "test_configuration_common": "test_configuration_common",
             "test_modeling_common": "test_modeling_common", "test_processing_common": "test_processing_common"}
    modules = {key: importlib.import_module(f"{PACKAGE}.{name}") for key, name in names.items()}
    _SUITES = Suites(source, stand_ins, modules)
    return _SUITES

