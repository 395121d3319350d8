#!/usr/bin/env bash
# Sets up and builds (scripts/setup.sh), then runs the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ctest --test-dir build --output-on-failure -j 2
