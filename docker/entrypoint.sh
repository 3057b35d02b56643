#!/bin/sh
# The image's entry (under tini).
#   serve [FLAGS]   (the default) `ocbridge init`, then `ocbridge serve` in its place
#   healthcheck     exit 0 when GET /readyz on OCBRIDGE_HTTP_PORT answers 200
#   anything else   run as given (`ocbridge run ...`, `nats-server ...`, `bash`)
# The configuration is the environment (OCBRIDGE_*) or a file named by OCBRIDGE_CONFIG.
set -eu

case "${1:-serve}" in
serve)
  [ $# -gt 0 ] && shift
  # The stream, consumer and buckets exist before the first sidecar ever fetched, so a task
  # published early is kept. The sidecar creates what is missing on start too: a failure here
  # (NATS not up yet) is no reason not to start. OCBRIDGE_INIT=false skips it.
  if [ "${OCBRIDGE_INIT:-true}" != false ]; then
    ocbridge init || echo "ocbridge-entrypoint: ocbridge init failed (exit $?); the sidecar sets up what is missing" >&2
  fi
  exec ocbridge serve "$@"
  ;;
healthcheck)
  exec python3 -c '
import os, sys, urllib.request
port = os.environ.get("OCBRIDGE_HTTP_PORT") or sys.exit("OCBRIDGE_HTTP_PORT is not set")
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4)
except Exception as exc:
    sys.exit(f"not ready: {exc}")
'
  ;;
*)
  exec "$@"
  ;;
esac
