"""`ragzip kv warm|stats|evict|verify`: manage a chunk KV store from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ragzip.batch import read_corpus
from ragzip.errors import InputError

app = typer.Typer(help="Chunk KV store: warm it from a JSONL of chunks, inspect, evict, verify.", no_args_is_help=True)

StoreOpt = Annotated[str | None, typer.Option("--store", help="memory | disk:/path (or a path) | redis://host:port/db; "
                                                     "default: <cache dir>/kv")]
CodecOpt = Annotated[str, typer.Option("--codec", help="raw | int8 | int4 | cachegen[:level] | kvtc[:level]")]


def _open(store: str | None, codec: str = "raw") -> Any:
    from ragzip.kvstore.stores.base import open_store
    from ragzip.settings import Settings

    return open_store(store or str(Settings().cache_dir / "kv"), codec=codec)


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
    from ragzip.kvstore.codecs import get_codec
    from ragzip.kvstore.codecs.cachegen import shipped_profiles
    from ragzip.kvstore.codecs.kvtc import shipped_kvtc_profiles
    from ragzip.registry import DEFAULT_LLM, load_causal_lm, resolve_dtype

    try:
        docs = read_corpus(data)[:limit]
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None
    alias = model or DEFAULT_LLM
    if codec == "auto":
        codec = "kvtc" if profile is not None or alias in shipped_kvtc_profiles() else "cachegen"
    if codec.startswith("cachegen"):
        chosen = get_codec(codec, profile=profile or (alias if alias in shipped_profiles() else None))
    elif codec.startswith("kvtc"):
        if profile is None and alias not in shipped_kvtc_profiles():
            raise typer.BadParameter(f"no shipped KVTC profile for {alias!r}: pass --profile PATH (see "
                                     f"scripts/calibrate_kvtc.py) or another --codec", param_hint="--codec")
        chosen = get_codec(codec, profile=profile or alias)
    else:
        chosen = get_codec(codec)
    kv = _open(store, "raw")
    kv.codec = chosen
    lm, tok = load_causal_lm(model, dtype=resolve_dtype(dtype))
    engine = KVReuseEngine(lm, tok, store=kv, run_self_check=False)
    stored = 0
    with typer.progressbar(docs, label="warming") as bar:
        for doc in bar:
            stored += engine.warm([doc], prefix=False)
    typer.echo(json.dumps({"chunks": len(docs), "already_stored": len(docs) - stored, "stored": stored,
                           "fingerprint": engine.fingerprint, **kv.stats()}))


@app.command()
def stats(store: StoreOpt = None) -> None:
    """Print the store's entries, bytes and counters as JSON."""
    typer.echo(json.dumps(_open(store).stats()))


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
    kv = _open(store)
    targets = list(key or [])
    if tag or all_:
        targets += [k for k in kv.keys() if all_ or k.startswith(f"{tag}-")]
    removed = sum(kv.remove(k) for k in targets)
    typer.echo(json.dumps({"removed": removed}))


@app.command()
def verify(store: StoreOpt = None) -> None:
    """Decode and checksum every entry; corrupt or foreign ones are evicted. Exit code 1 if any was bad."""
    kv = _open(store)
    result = kv.verify()
    typer.echo(json.dumps(result))
    if result["corrupt"] or result["foreign"]:
        raise typer.Exit(1)
