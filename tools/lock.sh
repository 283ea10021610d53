#!/usr/bin/env bash
# Re-resolve requirements.txt into requirements.lock: every package the project installs, transitive ones included,
# pinned exactly, as pip resolves them today for this machine's platform and Python. Run it after changing
# requirements.txt (or to take newer releases), run the tests, and commit both files: run_all.sh rebuilds its .venv
# whenever the lock changes.
#
#   bash tools/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# --isolated: no local pip configuration (an index or wheel folder with other torch builds) takes part
"$tmp/venv/bin/python" -m pip install --isolated --disable-pip-version-check -q -r requirements.txt
{
  echo "# Written by tools/lock.sh from requirements.txt on $(date -u +%Y-%m-%d), $(uname -s) $(uname -m)," \
       "$("$tmp/venv/bin/python" -c 'import platform as p; print(p.python_implementation(), p.python_version())')."
  echo "# Every package pinned exactly; run_all.sh installs this file into .venv. Do not edit: rerun tools/lock.sh."
  "$tmp/venv/bin/python" -m pip freeze --isolated --all --exclude pip
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
