#!/usr/bin/env bash
# Screenshot an igam HTML report with headless Chromium (Debian: apt-get install -y chromium).
#   scripts/screenshot_report.sh REPORT.html [OUT.png] [WIDTHxHEIGHT]
# Defaults: OUT = REPORT with .png, window 1280x2000. Nothing is fetched from the network: the report
# is self-contained and Chromium runs with its background networking switched off.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
report="$1"
out="${2:-${report%.*}.png}"
size="${3:-1280x2000}"
[[ -f "$report" ]] || { echo "screenshot_report: '$report' does not exist" >&2; exit 2; }
[[ "$size" =~ ^[0-9]+x[0-9]+$ ]] || { echo "screenshot_report: size must be WIDTHxHEIGHT, got '$size'" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[[ -n "$browser" ]] || { echo "screenshot_report: no chromium found; install it with 'apt-get install -y chromium'" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
abs_report="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
mkdir -p "$(dirname "$out")"
abs_out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$abs_out" \
  "file://$abs_report" >/dev/null 2>&1 || true
[[ -s "$abs_out" ]] || { echo "screenshot_report: chromium wrote no screenshot" >&2; exit 1; }
echo "$abs_out"
