#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the one lock every install of facetier uses (the README's two
# commands, .ci/run and both container images), after a deliberate upgrade: edit the ranges in
# pyproject.toml or the torch release in requirements/torch.txt, run this, then run the tests.
# The lock is universal (Python 3.10+ on Linux, macOS and Windows) and covers the core and every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "uv==0.13.9"
# the current pins seed the output, which uv keeps as preferences: adding a dependency moves nothing
# else. Pass --upgrade (or --upgrade-package NAME) to move pins deliberately.
grep -v '^#' requirements/lock.txt > requirements/lock.txt.new || true
python3 -m uv pip compile pyproject.toml "$@" --all-extras --universal --python-version 3.10 \
    --constraints requirements/torch.txt --no-header --output-file requirements/lock.txt.new
{
  echo "# facetier's lock: every package of the core and of each extra, pinned. Regenerate with requirements/compile.sh"
  echo "# (uv pip compile pyproject.toml --all-extras --universal --python-version 3.10 --constraints requirements/torch.txt)."
  echo "# Use it as a pip constraints file: pip install -c requirements/lock.txt ..."
  cat requirements/lock.txt.new
} > requirements/lock.txt
rm requirements/lock.txt.new
