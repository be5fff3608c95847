#!/usr/bin/env bash
# Install Debian's headless Chromium and its WebDriver for the console's browser tests (tests/web/test_browser.py),
# then print the variables the tests read:  eval "$(scripts/browser.sh env)"
#   scripts/browser.sh install   install chromium + chromium-driver with apt when missing (root; lock-safe)
#   scripts/browser.sh env       install if needed, then print SAGAS_TEST_CHROMIUM / SAGAS_TEST_CHROMEDRIVER
set -euo pipefail
CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver

install() {
  if [[ -x $CHROMIUM && -x $DRIVER ]]; then return 0; fi
  command -v apt-get >/dev/null || { echo "[browser] need chromium, but apt-get is not available" >&2; exit 1; }
  [[ $EUID -eq 0 ]] || { echo "[browser] need root to apt-get install chromium chromium-driver" >&2; exit 1; }
  echo "[browser] installing chromium chromium-driver (apt)" >&2
  # The lock timeout: another apt-get (another checkout's script, a developer) may be running at the same time.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver >/dev/null
}

case "${1:-env}" in
  install) install ;;
  env) install >&2; echo "export SAGAS_TEST_CHROMIUM=$CHROMIUM SAGAS_TEST_CHROMEDRIVER=$DRIVER" ;;
  *) echo "usage: $0 install|env" >&2; exit 2 ;;
esac
