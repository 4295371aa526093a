#!/bin/sh
# ephemeral-admin-setup SCRIPT|- [PACKAGE...]
#
# Run once by cloud-init (runcmd, as root): installs the session's packages, then runs its setup
# script, both logging to $EA_SETUP_DIR/setup.log (default /var/log/ephemeral-admin). The log is
# 0600, root's: a setup script may print secrets, and any other account on the box is not meant
# to read them; the login user reads it with sudo. When done it writes the exit status to
# setup.status next to the log (a number, world-readable): the launch, connected over SSH,
# follows the log until that file appears. POSIX sh.

dir=${EA_SETUP_DIR:-/var/log/ephemeral-admin}
script=$1
shift
mkdir -p "$dir" && chmod 755 "$dir"
log=$dir/setup.log
status=$dir/setup.status
rm -f "$status"
(umask 077 && : >"$log")
chmod 600 "$log"

install_packages() {
    [ "$#" -gt 0 ] || return 0
    echo "ephemeral-admin: installing $*"
    if command -v apt-get >/dev/null 2>&1; then
        # First boot may still hold the dpkg lock (unattended-upgrades): wait for it.
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update &&
            DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 install "$@"
    elif command -v dnf >/dev/null 2>&1; then
        dnf -y install "$@"
    elif command -v yum >/dev/null 2>&1; then
        yum -y install "$@"
    else
        echo "ephemeral-admin: no apt-get, dnf or yum on this box to install packages with"
        return 127
    fi
}

run_script() {
    [ "$script" != - ] || return 0
    echo "ephemeral-admin: running the setup script"
    case "$(head -c 2 "$script")" in
        '#!') "$script" ;;
        *) sh -e "$script" ;;
    esac
}

(install_packages "$@" && run_script) </dev/null >>"$log" 2>&1
rc=$?
echo "$rc" >"$status.tmp" && mv -f "$status.tmp" "$status"
exit "$rc"
