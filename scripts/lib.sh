#!/usr/bin/env bash
# Shared by scripts/test, scripts/demo and scripts/bench: installs what the local cloud needs,
# once. Re-running is fast: nothing already present is installed again.

MOTO_VERSION=5.2.1
# parliament lints the printed IAM policies and cloudsplaining looks for escalation (scripts/test).
PARLIAMENT_VERSION=1.6.4
CLOUDSPLAINING_VERSION=0.9.1
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO_ROOT/.venv"

# Installs the Debian packages named (none: nothing to do); as root only, else says what to run.
apt_install() {
  [ $# -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: $*; install them (as root: apt-get install $*)" >&2
    return 1
  fi
  echo "installing $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian packages: OpenSSH's sshd plays the box, shellcheck lints the watchdog, tmux and asciinema
# drive and replay the interactive shell in the tests.
ensure_packages() {
  local missing=()
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v tmux >/dev/null || missing+=(tmux)
  command -v asciinema >/dev/null || missing+=(asciinema)
  command -v curl >/dev/null || missing+=(curl)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  apt_install "${missing[@]}"
}

# moto[server], parliament and cloudsplaining, pinned, in the repo's own venv.
ensure_venv() {
  if ! "$VENV/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    echo "creating $VENV with moto[server]==$MOTO_VERSION" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('parliament') != '$PARLIAMENT_VERSION')" 2>/dev/null; then
    echo "installing parliament==$PARLIAMENT_VERSION into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check "parliament==$PARLIAMENT_VERSION"
  fi
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('cloudsplaining') != '$CLOUDSPLAINING_VERSION')" 2>/dev/null; then
    echo "installing cloudsplaining==$CLOUDSPLAINING_VERSION into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check "cloudsplaining==$CLOUDSPLAINING_VERSION"
  fi
}

# sshd refuses to start without its privilege separation directory.
ensure_sshd_dirs() {
  [ -d /run/sshd ] || mkdir -p /run/sshd 2>/dev/null || true
}

# The real-box tier: QEMU (TCG, or KVM when it can run the image's kernel), qemu-img for the
# per-boot overlay, debootstrap for the test image (tests/support/realbox/build-image).
ensure_realbox_packages() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v qemu-img >/dev/null || missing+=(qemu-utils)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v ssh-keyscan >/dev/null || missing+=(openssh-client)
  apt_install "${missing[@]}"
}
