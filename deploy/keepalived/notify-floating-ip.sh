#!/bin/sh
# keepalived's notify hook (keepalived-a.conf, keepalived-b.conf): called on every VRRP state
# change as `notify-floating-ip.sh INSTANCE|GROUP NAME STATE PRIORITY`, STATE being MASTER,
# BACKUP, FAULT or STOP. On a network where the floating IP is on-link keepalived has already
# added or removed it and this only logs; on a cloud where the provider routes the IP to one VM,
# MASTER is where this VM asks the provider's API for it.
#
# Install: /etc/keepalived/notify-floating-ip.sh, owned by root, mode 0700 (keepalived's
# enable_script_security refuses a script, or a directory above it, that others can write).
# It always exits 0: keepalived ignores the code anyway, and a failed API call is logged to be
# seen, not retried here (the next state change calls again).

type=${1:-?} name=${2:-?} state=${3:-?} priority=${4:-?}

log() {
    # To syslog / the journal when there is one, and always to stderr.
    logger -t keepalived-notify -- "$*" 2>/dev/null || true
    echo "keepalived-notify: $*" >&2
}

log "$type $name is now $state (priority $priority)"

case "$state" in
MASTER)
    # --- Hetzner Cloud: a Floating IP is routed to one server; assign it to this one. --------
    # Needs the hcloud CLI and a token with write access (HCLOUD_TOKEN, or `hcloud context` as
    # the script user). The VM must also have the IP on an interface to accept its traffic:
    # keep it in virtual_ipaddress as a /32, or configure it permanently on both VMs.
    #
    # FLOATING_IP_ID=12345678
    # SERVER=$(hostname)
    # if HCLOUD_TOKEN=$(cat /etc/keepalived/hcloud-token) \
    #     hcloud floating-ip assign "$FLOATING_IP_ID" "$SERVER" >/dev/null 2>&1; then
    #     log "floating IP $FLOATING_IP_ID assigned to $SERVER"
    # else
    #     log "hcloud floating-ip assign $FLOATING_IP_ID $SERVER failed"
    # fi

    # --- Any other provider: its CLI or API call that moves the IP to this VM. -------------
    # if ! /usr/local/sbin/move-floating-ip --to "$(hostname)"; then
    #     log "moving the floating IP to $(hostname) failed"
    # fi
    ;;
BACKUP | FAULT | STOP)
    # Nothing to do: the peer that becomes MASTER moves the IP to itself.
    ;;
esac
exit 0
