#!/usr/bin/env bash
# `pip install .` and `pip install -e .` must give the same imports, and nothing called plain
# `model` or `runtime` may land in site-packages.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

probe='
import importlib, pkgutil, sys
import steadysocket, steadysocket.model, steadysocket.runtime, steadysocket.testing
# Only names an import statement can spell: an editable install also finds the folder that
# holds the top-level package (runtime/top-level), which no "import" can name.
packages = (steadysocket.model, steadysocket.runtime, steadysocket.testing)
names = sorted({m.name for pkg in packages
                for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                if all(part.isidentifier() for part in m.name.split("."))})
for name in names:
    importlib.import_module(name)
for plain in ("model", "runtime"):
    try:
        importlib.import_module(plain)
    except ImportError:
        continue
    sys.exit(f"a top-level module {plain!r} is importable: {importlib.import_module(plain)}")
print("\n".join(names))
'
for mode in regular editable; do
    python3 -m venv "$work/$mode"
    "$work/$mode/bin/pip" install -q --upgrade pip
    if [ "$mode" = editable ]; then
        "$work/$mode/bin/pip" install -q -e "$root"
    else
        "$work/$mode/bin/pip" install -q "$root"
    fi
    site=$("$work/$mode/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    for plain in model runtime; do
        if [ -e "$site/$plain" ] || [ -e "$site/$plain.py" ]; then
            echo "install ($mode) put a top-level '$plain' in site-packages" >&2
            exit 1
        fi
    done
    (cd "$work" && "$work/$mode/bin/python" -c "$probe") > "$work/$mode.txt"
    echo "pip install ($mode): $(wc -l < "$work/$mode.txt") modules import under steadysocket.*"
done
diff -u "$work/regular.txt" "$work/editable.txt"
echo "regular and editable installs give the same imports"
