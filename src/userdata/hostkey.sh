#!/bin/sh
# ephemeral-admin-hostkey new | switch KEY: the box's own host key (src/commands/hostkey.rs)
set -eu
umask 077
dir=${EA_SSH_DIR:-/etc/ssh}
key=$dir/ssh_host_ed25519_key
next=$dir/ephemeral-admin-next-host-key

public_of() {
    ssh-keygen -y -f "$1" 2>/dev/null | cut -d' ' -f1,2
}

reload_sshd() {
    if [ -n "${EA_SSHD_PIDFILE:-}" ]; then
        kill -HUP "$(cat "$EA_SSHD_PIDFILE")"
    else
        systemctl reload ssh.service 2>/dev/null || systemctl reload sshd.service
    fi
    command -v ssh-keyscan >/dev/null || { sleep 2; return 0; }
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        ssh-keyscan -T 1 -t ed25519 -p "${EA_SSH_PORT:-22}" 127.0.0.1 2>/dev/null |
            grep -qF "$want" && return 0
        sleep 1
    done
    echo "ephemeral-admin-hostkey: sshd does not offer the new key" >&2
    exit 4
}

case ${1:-} in
new)
    if [ -z "$(public_of "$next")" ]; then
        rm -f "$next.tmp" "$next.tmp.pub"
        ssh-keygen -q -t ed25519 -N '' -C ephemeral-admin-host -f "$next.tmp" >/dev/null
        rm -f "$next.tmp.pub"
        mv -f "$next.tmp" "$next"
    fi
    public_of "$next"
    ;;
switch)
    want=$(printf '%s\n' "${2:-}" | cut -d' ' -f1,2)
    if [ -n "$want" ] && [ "$(public_of "$next")" = "$want" ]; then
        mv -f "$next" "$key"
    elif [ -z "$want" ] || [ "$(public_of "$key")" != "$want" ]; then
        echo "ephemeral-admin-hostkey: this box has no host key ${want:-(none given)} to switch to" >&2
        exit 3
    fi
    printf '%s ephemeral-admin-host\n' "$want" >"$key.pub.tmp"
    chmod 644 "$key.pub.tmp"
    mv -f "$key.pub.tmp" "$key.pub"
    reload_sshd
    echo switched
    ;;
*)
    echo "usage: ephemeral-admin-hostkey new | switch PUBLIC-KEY" >&2
    exit 2
    ;;
esac
