#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs provd's main job on its embedded
# default: build the hello plugin into a component and run it in provd's
# sandboxed engine, printing its log, progress and report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
provctl() { cargo run -q --release -p provctl -- "$@"; }
data_dir="${PROVD_DATA_DIR:-$(mktemp -d -t provd-quickstart-XXXXXX)}"
echo "quickstart: building the hello plugin"
provctl plugin build examples/hello
echo "quickstart: running it in provd's engine"
provctl plugin run examples/hello --input examples/hello/request.json --data-dir "$data_dir"
echo "quickstart: compiled-artifact cache in $data_dir/cache"
