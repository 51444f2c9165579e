"""`ragzip kv warm|qualify|stats|list|evict|verify`: manage a chunk KV store from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ragzip.batch import read_corpus
from ragzip.errors import InputError

app = typer.Typer(help="Chunk KV store: warm it from a JSONL of chunks, qualify a model for blending, inspect, list, "
                       "evict, verify.",
                  no_args_is_help=True, rich_markup_mode=None)

StoreOpt = Annotated[str | None, typer.Option("--store", help="memory | disk:/path (or a path) | redis://host:port/db; "
                                                     "default: <cache dir>/kv")]
CodecOpt = Annotated[str, typer.Option("--codec", help="raw | int8 | int4 | cachegen[:level] | kvtc[:level]")]


def _spec(store: str | None) -> str:
    from ragzip.settings import Settings

    return store or str(Settings().cache_dir / "kv")


def _open(store: str | None, codec: str = "raw") -> Any:
    from ragzip.kvstore.stores.base import open_store

    return open_store(_spec(store), codec=codec)


def _open_existing(store: str | None) -> tuple[Any, dict[str, Any]]:
    """The store to inspect or change and its stats: exit 1 (nothing created) for a disk path with no store, the
    in-process memory store, or a backend that does not answer."""
    from ragzip.kvstore.stores.base import open_store

    spec = _spec(store)
    if spec == "memory":
        _exit(1, "the memory store lives inside one process; there is nothing to inspect from the command line")
    if not spec.startswith(("redis://", "rediss://", "unix://")):
        root = Path(spec.removeprefix("disk:")).expanduser()
        if not root.is_dir():
            _exit(1, f"no KV store at {root} (fill one with `ragzip kv warm ... --store {root}`)")
    kv = open_store(spec)
    info = kv.stats()
    if not info.get("available", True):
        _exit(1, f"KV store {spec} is unreachable: {info.get('last_error')}")
    return kv, info


def _exit(code: int, message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _codec_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The codecs the entries were written with (what decoding them needs), from their headers."""
    counts: dict[str, int] = {}
    for e in entries:
        name = e["codec"] if e["codec"] is None else f"{e['codec']}:v{e['codec_version']}"
        counts[str(name)] = counts.get(str(name), 0) + 1
    names = {e["codec"] for e in entries}
    codec = None if not names else names.pop() if len(names) == 1 else "mixed"
    return {"codec": codec, "codecs": counts}


def _codec(codec: str, alias: str, profile: str | None) -> Any:
    """The codec `--codec` names for this model (auto: kvtc with a shipped profile, else cachegen)."""
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.codecs.cachegen import shipped_profiles
    from ragzip.kvstore.codecs.kvtc import shipped_kvtc_profiles
    from ragzip.registry import LLM_ALIASES

    alias = LLM_ALIASES.get(alias, alias)  # "qwen2.5-0.5b" finds the profile shipped for its canonical name
    if codec == "auto":
        codec = "kvtc" if profile is not None or alias in shipped_kvtc_profiles() else "cachegen"
    if codec.startswith("cachegen"):
        return get_codec(codec, profile=profile or (alias if alias in shipped_profiles() else None))
    if codec.startswith("kvtc"):
        if profile is None and alias not in shipped_kvtc_profiles():
            raise typer.BadParameter(f"no shipped KVTC profile for {alias!r}: pass --profile PATH (see "
                                     f"scripts/calibrate_kvtc.py) or another --codec", param_hint="--codec")
        return get_codec(codec, profile=profile or alias)
    return get_codec(codec)


@app.command()
def warm(
    data: Annotated[Path, typer.Argument(help="JSONL of chunks ({'text', 'title'?} lines, an index's "
                                              "documents.jsonl, or common-schema examples)")],
    store: StoreOpt = None,
    codec: Annotated[str, typer.Option("--codec", help="auto (kvtc if the model has a shipped profile, else "
                                                       "cachegen) | raw | int8 | int4 | cachegen[:level] | "
                                                       "kvtc[:level]")] = "auto",
    model: Annotated[str | None, typer.Option(help="LLM alias, path or HF name")] = None,
    dtype: Annotated[str, typer.Option(help="auto (as the proxy and `ragzip ask` resolve it) | bfloat16 | "
                                            "float32")] = "auto",
    limit: Annotated[int | None, typer.Option(help="at most this many chunks")] = None,
    profile: Annotated[str | None, typer.Option(help="the codec's profile for kvtc / cachegen (path or shipped "
                                                     "model alias); default: the model's shipped one if any")] = None,
) -> None:
    """Store every chunk's KV exactly as the KV engine will look it up (same prompt pieces, header and dtype),
    so a proxy or `ragzip ask` using this store hits on every chunk. Chunks already stored are skipped."""
    from ragzip.kv_engine import KVReuseEngine
    from ragzip.registry import DEFAULT_LLM, load_causal_lm, resolve_dtype

    try:
        docs = read_corpus(data)[:limit]
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None
    chosen = _codec(codec, model or DEFAULT_LLM, profile)  # before the store exists: a bad codec creates nothing
    kv = _open(store, "raw")
    kv.codec = chosen
    lm, tok = load_causal_lm(model, dtype=resolve_dtype(dtype))
    engine = KVReuseEngine(lm, tok, store=kv, run_self_check=False)
    from ragzip.progress import Progress

    stored = 0
    with Progress("warming", total=len(docs)) as bar:
        for doc in docs:
            stored += engine.warm([doc], prefix=False)
            bar.advance()
    typer.echo(json.dumps({"chunks": len(docs), "already_stored": len(docs) - stored, "stored": stored,
                           "fingerprint": engine.fingerprint, **kv.stats()}))


@app.command()
def qualify(
    model: Annotated[str | None, typer.Argument(help="LLM alias, path or HF name (default: the default LLM)")] = None,
    dtype: Annotated[str, typer.Option(help="auto (as the proxy and `ragzip ask` resolve it) | bfloat16 | "
                                            "float32")] = "auto",
    codec: Annotated[str, typer.Option("--codec", help="the codec the store holds entries in: raw | int8 | int4 | "
                                                       "cachegen[:level] | kvtc[:level] | auto")] = "raw",
    profile: Annotated[str | None, typer.Option(help="kvtc / cachegen profile (path or shipped alias)")] = None,
    prompts: Annotated[int, typer.Option(min=1, max=38, help="calibration prompts (bundled SQuAD paragraphs, "
                                                              "six a prompt)")] = 10,
    docs_per_prompt: Annotated[int, typer.Option(min=1, max=38, help="paragraphs a calibration prompt (6: ~1k "
                                                                     "tokens; 38: ~5k); a verdict covers prompts up "
                                                                     "to 1.25x the longest")] = 6,
    ratios: Annotated[str, typer.Option(help="recompute ratios to try, ascending")] = "0.15,0.3,0.5",
    threshold: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of prompts whose greedy answers must "
                                                                    "be identical to full prefill's")] = 0.9,
    force: Annotated[bool, typer.Option("--force", help="calibrate even when a verdict is cached")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
) -> None:
    """Qualify a model (dtype, codec) for blended KV reuse: the smallest recompute ratio whose greedy answers are
    identical to full prefill's on the calibration prompts, or unqualified. Cached under the cache dir; the KV
    engine's default mode `auto` reads it (and runs this itself on first use). Prints the verdict as JSON."""
    from ragzip.errors import RagzipError
    from ragzip.kv_engine import KVReuseEngine
    from ragzip.kv_qualify import load_or_qualify
    from ragzip.kvstore.stores.memory import MemoryStore
    from ragzip.registry import DEFAULT_LLM, load_causal_lm, resolve_dtype

    try:
        steps = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {ratios!r}", param_hint="--ratios") from None
    try:
        lm, tok = load_causal_lm(model, dtype=resolve_dtype(dtype, device), device=device)
        store = MemoryStore(codec=_codec(codec, model or DEFAULT_LLM, profile))
        engine = KVReuseEngine(lm, tok, store=store, qualification=None)
        verdict = load_or_qualify(engine, force=force, ratios=steps, threshold=threshold, prompts=prompts,
                                  docs_per_prompt=docs_per_prompt)
    except RagzipError as exc:
        _exit(2, str(exc))
    typer.echo(json.dumps({"model": model or DEFAULT_LLM, "fingerprint": engine.fingerprint,
                           **{k: v for k, v in verdict.as_dict().items() if k not in ("format", "version")}}))


@app.command()
def stats(store: StoreOpt = None) -> None:
    """Print the store's entries, bytes, the codecs its entries were written with, and counters, as JSON. Exit 1
    when there is no store there or it does not answer."""
    kv, info = _open_existing(store)
    info.update(_codec_summary(list(kv.entries())))
    typer.echo(json.dumps(info))


@app.command(name="list")
def list_entries(
    store: StoreOpt = None,
    tag: Annotated[str | None, typer.Option(help="only one model's entries (the 12-hex prefix of its keys)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many entries")] = None,
) -> None:
    """One JSON line per entry: key, bytes, codec, codec_version, tokens, fingerprint (read from its header)."""
    kv, _ = _open_existing(store)
    shown = 0
    for entry in kv.entries():
        if tag and not entry["key"].startswith(f"{tag}-"):
            continue
        if limit is not None and shown >= limit:
            break
        typer.echo(json.dumps(entry))
        shown += 1


@app.command()
def evict(
    store: StoreOpt = None,
    key: Annotated[list[str] | None, typer.Option("--key", help="a chunk key (repeatable)")] = None,
    tag: Annotated[str | None, typer.Option(help="every entry of one model (the 12-hex prefix of its keys)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every entry")] = False,
) -> None:
    """Delete entries by key, by model tag, or all of them."""
    if not (key or tag or all_):
        raise typer.BadParameter("give --key, --tag or --all")
    kv, _ = _open_existing(store)
    targets = list(key or [])
    if tag or all_:
        targets += [k for k in kv.keys() if all_ or k.startswith(f"{tag}-")]
    removed = sum(kv.remove(k) for k in targets)
    typer.echo(json.dumps({"removed": removed}))


@app.command()
def verify(store: StoreOpt = None) -> None:
    """Decode and checksum every entry; corrupt or foreign ones are evicted. Exit code 1 if any was bad."""
    kv, _ = _open_existing(store)
    result = kv.verify()
    typer.echo(json.dumps(result))
    if result["corrupt"] or result["foreign"]:
        raise typer.Exit(1)
