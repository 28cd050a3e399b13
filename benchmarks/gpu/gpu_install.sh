#!/usr/bin/env bash
# Install this checkout on an offline GPU machine (torch and triton already there, no network):
# pip install -e . with no dependencies and no build isolation. Idempotent: an embedattn that already imports
# from this checkout is left alone. When the editable install fails, this checkout goes on PYTHONPATH
# (embedattn/kernels is the repository's link to kernels/): the folder is printed, and written to
# $PYTHONPATH_FILE when that is set, for the caller to export.
#
#   bash benchmarks/gpu/gpu_install.sh        (PY: the python to install into, default python3)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PY=${PY:-python3}
HERE=$PWD

check() {  # imports embedattn from this checkout, run from elsewhere so the working folder proves nothing
    (cd /tmp && "$PY" - "$HERE" <<'PYEOF'
import os, sys
import embedattn, embedattn.configs, embedattn.kernels.attention as k
root = os.path.realpath(sys.argv[1])
print(f"embedattn {os.path.dirname(embedattn.__file__)}, kernels {os.path.dirname(k.__file__)}")
sys.exit(0 if os.path.realpath(embedattn.__file__).startswith(root + os.sep) else 1)
PYEOF
    )
}

if check 2>/dev/null; then
    echo "embedattn already installed from $HERE"
    exit 0
fi
"$PY" -c "import setuptools, pip; print('setuptools', setuptools.__version__, 'pip', pip.__version__)"
if "$PY" -m pip install -q --no-deps --no-build-isolation -e . > /tmp/embedattn_pip.log 2>&1 && check; then
    exit 0
fi
echo "editable install failed (/tmp/embedattn_pip.log):"
tail -n 20 /tmp/embedattn_pip.log
[ -n "${PYTHONPATH_FILE:-}" ] && echo "$HERE" > "$PYTHONPATH_FILE"
echo "PYTHONPATH=$HERE"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" check
