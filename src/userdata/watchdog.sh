#!/bin/sh
# ephemeral-admin-watchdog: powers the box off when SSH is idle, when nobody
# ever connected, or at the deadline (tag via IMDSv2, else the baked one).
# Activity is an authenticated SSH session of the box's own sshd, never a mere
# TCP connection: a socket to port 22 (from anywhere, loopback included) that
# has not logged in keeps nothing up.
# Every EA_* is overridable from the environment (watchdog.env).
: "${EA_IMDS_URL:=http://169.254.169.254}"
: "${EA_IMDS_TIMEOUT:=2}"
: "${EA_SSHD_PID:=}"                   # the box's sshd (listener) pid, else:
: "${EA_SSHD_PIDFILE:=/run/sshd.pid}" # its pid file, else the unit's MainPID
: "${EA_POWEROFF_CMD:=systemctl poweroff}"
: "${EA_WALL_CMD:=wall}" # run as: $EA_WALL_CMD "message" (one argument)
: "${EA_INTERVAL:=5}"
: "${EA_IDLE_GRACE:=120}"
: "${EA_BOOT_GRACE:=600}"
: "${EA_DEADLINE:=}" # baked hard deadline, epoch seconds (required)
: "${EA_CAP:=}"      # launch + max_runtime_cap, epoch seconds: no deadline goes past it
: "${EA_EXPIRES_TAG:=ephemeral-admin:expires-at}"
: "${EA_WARN_BEFORE:=600 60}"
: "${EA_STATE_DIR:=/run/ephemeral-admin}"
: "${EA_NOW_CMD:=date +%s}"

log() { echo "ephemeral-admin-watchdog: $*"; }
now() { eval "$EA_NOW_CMD"; }
say() { eval "$EA_WALL_CMD \"ephemeral-admin: \$1\"" >/dev/null 2>&1 || log "wall failed"; }
isnum() { case $1 in '' | *[!0-9]*) return 1 ;; esac; }

poweroff() { # reason detail...
	echo "$1" >"$EA_STATE_DIR/poweroff-reason"
	log "poweroff reason=$*"
	say "this box is powering off now (reason: $1)"
	while :; do
		eval "$EA_POWEROFF_CMD" || log "poweroff command failed"
		sleep 60
	done
}

# IMDSv2 GET of meta-data/$1 into $body; fails unless HTTP 200.
imds() {
	for _ in 1 2; do
		[ -n "$tok" ] || tok=$(curl -sf -m "$EA_IMDS_TIMEOUT" -X PUT \
			-H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' \
			"$EA_IMDS_URL/latest/api/token") || tok=
		[ -n "$tok" ] || return 1
		code=$(curl -s -m "$EA_IMDS_TIMEOUT" -o "$body" -w '%{http_code}' \
			-H "X-aws-ec2-metadata-token: $tok" "$EA_IMDS_URL/latest/meta-data/$1")
		[ "$code" = 401 ] || break
		tok=
	done
	[ "$code" = 200 ]
}

# The box's sshd listener: EA_SSHD_PID, its pid file, or ssh(d).service's
# MainPID; nothing when none is running.
sshd_pid() {
	p=$EA_SSHD_PID
	[ -n "$p" ] || p=$(cat "$EA_SSHD_PIDFILE" 2>/dev/null)
	if ! isnum "$p" || [ ! -d "/proc/$p" ]; then
		p=$(systemctl show -p MainPID --value ssh.service sshd.service 2>/dev/null |
			awk '$1 > 0 { print $1; exit }')
	fi
	isnum "$p" && [ -d "/proc/$p" ] && echo "$p"
}

# Authenticated SSH sessions: sshd's per-connection processes past login,
# titled "sshd: USER" (no session channel yet, e.g. ssh -N), "sshd: USER@notty"
# or "sshd: USER@pts/N" ("sshd-session: ..." from OpenSSH 9.8 on), each a
# child or grandchild (privilege separation) of the box's sshd listener. A
# connection still authenticating is "[accepted]", "USER [priv]", "[net]" or
# "[preauth]" and does not count; nor does a process of a session (deeper down)
# that renames itself. With no listener known (sshd run per connection), a
# session process counts when its parent is sshd's.
sessions() {
	ps -e -o pid= -o ppid= -o args= 2>/dev/null | awk -v m="$(sshd_pid)" '
		{ up[$1] = $2; t = $0; sub(/^ *[0-9]+ +[0-9]+ +/, "", t); title[$1] = t
		  if (t ~ /^sshd(-session)?: [^ [][^ ]*$/) s[$1] = 1 }
		END {
			for (p in s) {
				q = up[p]
				if (m != "" && (q == m || up[q] == m)) c++
				else if (m == "" && title[q] ~ /^(sshd|\/usr\/sbin\/sshd)/) c++
			}
			print c + 0
		}'
}

command -v ps >/dev/null 2>&1 || log "error ps not found (procps): no SSH session can be seen"
mkdir -p "$EA_STATE_DIR"
body=$EA_STATE_DIR/imds.out
tok=
# The start time and "a connection was seen" survive a restart of the unit.
[ -s "$EA_STATE_DIR/started" ] || now >"$EA_STATE_DIR/started"
start=$(cat "$EA_STATE_DIR/started")
isnum "$start" || start=$(now)
seen=
[ -e "$EA_STATE_DIR/seen" ] && seen=1
if ! isnum "$EA_DEADLINE"; then
	EA_DEADLINE=$((start + EA_BOOT_GRACE))
	log "error EA_DEADLINE missing or invalid, using start+boot_grace=$EA_DEADLINE"
fi
deadline=$EA_DEADLINE
dsrc=baked
isnum "$EA_CAP" || EA_CAP=
ignored=
last=
warned=
idle_since=
ncon=-1
spot=
log "start sshd=$(sshd_pid || echo unknown) interval=${EA_INTERVAL}s idle_grace=${EA_IDLE_GRACE}s boot_grace=${EA_BOOT_GRACE}s cap=${EA_CAP:-none} baked_deadline=$EA_DEADLINE"

while :; do
	t=$(now)

	# Deadline: the tag wins; on failure keep the last good value.
	if imds "tags/instance/$EA_EXPIRES_TAG"; then
		v=$(cat "$body")
		case $v in
		[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]*)
			d=$(date -u -d "$v" +%s 2>/dev/null) && isnum "$d" && deadline=$d dsrc=imds
			;;
		esac
	fi
	# The cap beats every deadline: a tag past it (set by anyone) is ignored.
	if [ -n "$EA_CAP" ] && [ "$deadline" -gt "$EA_CAP" ]; then
		[ "$ignored" = "$dsrc:$deadline" ] ||
			log "deadline source=$dsrc value=$deadline is past the cap $EA_CAP: ignored"
		ignored=$dsrc:$deadline deadline=$EA_CAP dsrc=cap
	fi
	if [ "$dsrc:$deadline" != "$last" ]; then
		log "deadline source=$dsrc value=$deadline in=$((deadline - t))s"
		# A later deadline re-arms the warnings.
		[ -n "$last" ] && [ "$deadline" -gt "${last#*:}" ] && warned=
		last=$dsrc:$deadline
	fi
	left=$((deadline - t))
	[ "$left" -le 0 ] && poweroff deadline "deadline=$deadline source=$dsrc"
	w=
	for m in $EA_WARN_BEFORE; do
		case " $warned " in *" $m "*) continue ;; esac
		[ "$left" -le "$m" ] && warned="$warned $m" w=1
	done
	if [ -n "$w" ]; then
		log "warn deadline in=${left}s"
		say "this box powers off in $((left / 60))m$((left % 60))s (deadline); extend it with the CLI if needed"
	fi

	# Spot interruption notice: tell everyone once per notice.
	if imds spot/instance-action; then
		v=$(cat "$body")
		if [ "$v" != "$spot" ]; then
			spot=$v
			act=$(echo "$v" | sed -n 's/.*"action" *: *"\([^"]*\)".*/\1/p')
			at=$(echo "$v" | sed -n 's/.*"time" *: *"\([^"]*\)".*/\1/p')
			s=$(date -u -d "$at" +%s 2>/dev/null) || s=$t
			log "spot-notice action=$act time=$at in=$((s - t))s"
			say "AWS spot interruption: action=$act at $at (in $((s - t))s); save your work"
		fi
	fi

	# SSH idleness (-gt: whole seconds, so never earlier than the grace).
	n=$(sessions)
	if [ "$n" != "$ncon" ]; then
		log "ssh connections=$n"
		ncon=$n
	fi
	if [ "$n" -gt 0 ]; then
		[ -n "$seen" ] || : >"$EA_STATE_DIR/seen"
		seen=1 idle_since=
	elif [ -n "$seen" ]; then
		[ -n "$idle_since" ] || idle_since=$t
		[ $((t - idle_since)) -gt "$EA_IDLE_GRACE" ] &&
			poweroff idle "idle_for=$((t - idle_since))s"
	elif [ $((t - start)) -gt "$EA_BOOT_GRACE" ]; then
		poweroff never-connected "waited=$((t - start))s"
	fi

	sleep "$EA_INTERVAL"
done
