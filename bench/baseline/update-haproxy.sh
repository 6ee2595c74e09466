#!/bin/bash
# update-haproxy.sh NAME FRONTEND_PORT BACKEND_PORT DST_IP ACTION
#
# A re-creation of the design lbagent replaces, for bench/compare.sh: webhook runs this script
# for every phone-home call (hooks.json), after it has already answered 200. It writes one
# fragment per frontend port (one server per port: the last caller wins), regenerates the whole
# haproxy.cfg from the fragments, validates it with `haproxy -c` and reloads HAProxy:
#
#   BASELINE_RELOAD=reload   `systemctl reload haproxy` on Debian: SIGUSR2 to the master of a
#                            master-worker HAProxy (a seamless reload, listeners handed over)
#   BASELINE_RELOAD=restart  `systemctl restart haproxy`, as the original first did: stop the
#                            master (its workers go with it), wait for it to exit, start anew
#
# Like the original it checks no input (whatever the JSON says goes into the config), ignores
# ACTION (nothing is ever removed) and takes no lock (webhook runs simultaneous calls at once).
#
# Environment (set by bench/compare.sh when it starts webhook): BASELINE_STATE, the directory
# with global.cfg, conf.d/, haproxy.cfg, haproxy.pid and master.sock; BASELINE_RELOAD;
# HAPROXY_BIN; FRONTEND_BIND.

STATE=${BASELINE_STATE:?BASELINE_STATE is not set}
HAPROXY=${HAPROXY_BIN:-haproxy}

# Bench instrumentation only (not part of the old design): one line per finished run, so the
# bench knows when every call has finished and how it ended.
trap 'echo "$$ $? $(date +%s.%N)" >> "$STATE/runs.log"' EXIT

NAME=$1
FRONTEND_PORT=$2
BACKEND_PORT=$3
DST_IP=$4
# shellcheck disable=SC2034 # ACTION is never looked at, as in the original
ACTION=$5

mkdir -p "$STATE/conf.d"
cat > "$STATE/conf.d/$FRONTEND_PORT.cfg" <<EOF

frontend ${NAME}_${FRONTEND_PORT}
    bind ${FRONTEND_BIND:-*}:$FRONTEND_PORT
    mode tcp
    default_backend ${NAME}_${FRONTEND_PORT}_backend

backend ${NAME}_${FRONTEND_PORT}_backend
    mode tcp
    server $NAME $DST_IP:$BACKEND_PORT check
EOF

cat "$STATE/global.cfg" "$STATE"/conf.d/*.cfg > "$STATE/haproxy.cfg"

"$HAPROXY" -c -q -f "$STATE/haproxy.cfg" || exit 1

case "${BASELINE_RELOAD:-reload}" in
reload)
    kill -USR2 "$(cat "$STATE/haproxy.pid")"
    ;;
restart)
    pid=$(cat "$STATE/haproxy.pid")
    kill -TERM "$pid"
    # What systemd does between stop and start: wait for the old master to exit (bounded). An
    # exited process counts as gone while it is a zombie: systemd reaps its child at once, the
    # bench machine's init only every second or two.
    for _ in $(seq 1 1000); do
        state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) || break
        [ "$state" = Z ] && break
        sleep 0.005
    done
    "$HAPROXY" -W -D -p "$STATE/haproxy.pid" -S "$STATE/master.sock,mode,600" \
        -f "$STATE/haproxy.cfg"
    ;;
esac
