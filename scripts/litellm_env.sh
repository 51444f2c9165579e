#!/usr/bin/env bash
# Builds .venv-litellm: LiteLLM's proxy (pinned) in its own venv, because litellm[proxy] pins versions the main venv
# must not take (huggingface-hub<2, rich<14, websockets<16). ragzip and its models come from the main venv, chained
# in after LiteLLM's own packages (a .pth that adds the main venv's site-packages last), so LiteLLM can load the
# `ragzip.litellm` guardrail in-process without a second copy of torch. Idempotent; used by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN="${VENV:-.venv}"
DEST="${LITELLM_VENV:-.venv-litellm}"
SPEC="${LITELLM_SPEC:-litellm[proxy]==1.108.7}"
STAMP="$DEST/.ragzip-litellm-$(echo "$SPEC" | tr -c 'A-Za-z0-9.' '_')"
[ -f "$STAMP" ] && exit 0
"$MAIN/bin/python" -m venv "$DEST"
"$DEST/bin/python" -m pip install -q --upgrade pip
"$DEST/bin/python" -m pip install -q "$SPEC"
own=$("$DEST/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
main=$(cd "$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" && pwd)
echo "import site; site.addsitedir('$main')" > "$own/zz_ragzip_main_venv.pth"
"$DEST/bin/python" -c "import litellm.proxy.proxy_server, ragzip.litellm" >/dev/null
touch "$STAMP"
echo "litellm-env: $SPEC in $DEST"
