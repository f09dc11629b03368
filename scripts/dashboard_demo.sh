#!/usr/bin/env bash
# Draws docs/dashboard.png: 150 s of real traffic on the embedded model, scraped by a real Prometheus, every Grafana
# panel plotted from its query (tests/opskit/demo.py). Extra arguments go to the demo (e.g. --seconds 60 --out x.png).
set -euo pipefail
cd "$(dirname "$0")/../tests"
exec ../.venv/bin/python -m opskit.demo --out ../docs/dashboard.png "$@"
