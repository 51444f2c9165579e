from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_subsystems_import_under_one_namespace() -> None:
    code = "import ragzip.compressors, ragzip.kvstore, ragzip.retrieval, ragzip.kernels, ragzip.server, ragzip.eval"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_no_generic_top_level_modules_are_installed() -> None:
    for name in ("kernels", "server", "compressors", "kvstore", "retrieval", "eval"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "ragzip" not in str(spec.origin or spec.submodule_search_locations), name


def test_import_ragzip_is_light() -> None:
    code = "import sys, ragzip; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
