"""Where a chat request's context comes from, and how the compressed context goes back into the messages.

A delimited block inside any message is recognised as context:

    <documents>
    <document id="d1" title="Paris">Paris is the capital of France.</document>
    <document id="d2">...</document>
    </documents>

A block without `<document>` elements is split on blank lines, one document per paragraph. The block is
replaced in place by the compressed context, rendered in the same format and marked
`<documents compressed-by="ragzip">`, so that a ragzip server further down a chain (a proxy in front of a ragzip
server with a local engine) passes it on as it is instead of compressing it a second time.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragzip.contract import to_documents
from ragzip.types import CompressedDocument, Document

_BLOCK = re.compile(r"<documents(\s[^>]*)?>(.*?)</documents>", re.DOTALL | re.IGNORECASE)
COMPRESSED_MARK = 'compressed-by="ragzip"'  # on the blocks ragzip renders: already compressed
_DOC = re.compile(r"<document\b([^>]*)>(.*?)</document>", re.DOTALL | re.IGNORECASE)
_ATTR = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*"([^"]*)"')
_PARAGRAPHS = re.compile(r"\n\s*\n")


def content_text(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, or the text parts of a list joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))


def parse_block(inner: str) -> list[Document]:
    """Documents of one `<documents>` block (ids default to `block-<i>`)."""
    found = list(_DOC.finditer(inner))
    items: list[dict[str, str] | str] = []
    for m in found:
        attrs = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(m.group(1))}
        items.append({"text": m.group(2).strip(), "title": attrs.get("title", ""),
                      **({"id": attrs["id"]} if attrs.get("id") else {})})
    if not found:
        items = [p.strip() for p in _PARAGRAPHS.split(inner) if p.strip()]
    return to_documents(items, where="the <documents> block", default_ids=[f"block-{i}" for i in range(len(items))])


def render_block(documents: Sequence[Document | CompressedDocument]) -> str:
    """The `<documents>` block for `documents` (attributes escaped; text as is)."""
    lines = [f"<documents {COMPRESSED_MARK}>"]
    for d in documents:
        title = f' title="{html.escape(d.title, quote=True)}"' if d.title else ""
        lines.append(f'<document id="{html.escape(d.id, quote=True)}"{title}>\n{d.text}\n</document>')
    lines.append("</documents>")
    return "\n".join(lines)


@dataclass(slots=True)
class BlockLocation:
    """Where the `<documents>` block was: message index, and part index when the content is a list."""

    message: int
    part: int | None


@dataclass(slots=True)
class ChatContext:
    """Messages as plain dicts, the question to compress for, and the documents found (if any)."""

    messages: list[dict[str, Any]]
    query: str
    documents: list[Document] = field(default_factory=list)
    source: str = "none"
    block: BlockLocation | None = None
    already_compressed: bool = False  # the block carries COMPRESSED_MARK: a ragzip server in front compressed it


def last_user_index(messages: Sequence[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def _find_block(messages: Sequence[dict[str, Any]]) -> tuple[BlockLocation, re.Match[str]] | None:
    for i in range(len(messages) - 1, -1, -1):
        content = messages[i].get("content")
        if isinstance(content, str):
            m = _BLOCK.search(content)
            if m:
                return BlockLocation(i, None), m
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    m = _BLOCK.search(part["text"])
                    if m:
                        return BlockLocation(i, j), m
    return None


def _set_text(messages: list[dict[str, Any]], loc: BlockLocation, text: str) -> None:
    if loc.part is None:
        messages[loc.message]["content"] = text
    else:
        messages[loc.message]["content"][loc.part]["text"] = text


def _get_text(messages: list[dict[str, Any]], loc: BlockLocation) -> str:
    if loc.part is None:
        return str(messages[loc.message]["content"])
    return str(messages[loc.message]["content"][loc.part]["text"])


def extract(messages: list[dict[str, Any]], documents: list[Document] | None) -> ChatContext:
    """Find the context: explicit `documents` first, else a `<documents>` block in the messages. The query is
    the last user message's text (without any block)."""
    user = last_user_index(messages)
    if documents:
        query = content_text(messages[user].get("content")) if user is not None else ""
        return ChatContext(messages, query.strip(), list(documents), "documents")
    found = _find_block(messages)
    if found is None:
        query = content_text(messages[user].get("content")) if user is not None else ""
        return ChatContext(messages, query.strip())
    loc, match = found
    docs = parse_block(match.group(2))
    marked = {k.lower(): v for k, v in _ATTR.findall(match.group(1) or "")}.get("compressed-by") == "ragzip"
    text = _get_text(messages, loc)
    # Keep a placeholder where the block was so the compressed block goes back in the same place.
    _set_text(messages, loc, text[: match.start()] + "\x00RAGZIP\x00" + text[match.end():])
    query = ""
    if user is not None:
        query = content_text(messages[user].get("content")).replace("\x00RAGZIP\x00", " ")
    return ChatContext(messages, " ".join(query.split()), docs, "messages", loc, already_compressed=marked)


def inject(ctx: ChatContext, compressed: Sequence[Document | CompressedDocument]) -> list[dict[str, Any]]:
    """Messages with the compressed context: the block replaced in place, or a block put in front of the last
    user message (a trailing system message when there is no user message)."""
    messages = [dict(m) for m in ctx.messages]
    for m in messages:
        if isinstance(m.get("content"), list):
            m["content"] = [dict(p) if isinstance(p, dict) else p for p in m["content"]]
    block = render_block(compressed) if compressed else ""
    if ctx.block is not None:
        text = _get_text(messages, ctx.block).replace("\x00RAGZIP\x00", block)
        _set_text(messages, ctx.block, text)
        return messages
    if not compressed:
        return messages
    user = last_user_index(messages)
    if user is None:
        messages.append({"role": "system", "content": block})
    elif isinstance(messages[user].get("content"), list):
        messages[user]["content"] = [{"type": "text", "text": block}, *messages[user]["content"]]
    else:
        messages[user]["content"] = f"{block}\n\n{messages[user].get('content') or ''}"
    return messages
