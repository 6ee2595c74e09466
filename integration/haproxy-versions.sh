#!/usr/bin/env bash
# Prepares Debian's own HAProxy builds of the versions lbagent supports beside the machine's:
# 3.0 from Debian 13 "trixie" and 3.2 from Debian unstable "sid". For each it makes a minimal
# Debian root with debootstrap (once: a second run reuses a finished root) and writes a wrapper,
# `haproxy-3.0` / `haproxy-3.2`, that runs that root's HAProxy as a drop-in for a native binary.
#
# The wrapper runs the root's /usr/sbin/haproxy in a private mount namespace in which the root's
# /usr (and its ld.so.cache) is bind-mounted over the machine's. Everything else stays the
# machine's own: the caller's temporary directories, the repository, /proc, /dev, /run, so
# every path a test passes means the same file. The wrapper and `unshare` exec, never fork, so
# the caller's child pid is HAProxy's master itself: same arguments, exit status and signals.
# A master-worker re-exec runs /usr/sbin/haproxy again inside the same namespace, which is the
# root's binary, and the namespace disappears with the last HAProxy process.
#
# Needs root (debootstrap, mount namespaces) and debootstrap (apt-get install -y debootstrap).
# The Debian mirror is the one this machine's apt already uses (`apt-get indextargets`); no
# mirror is named here. Prints, per version, the wrapper's path and its `haproxy -v` line.
#
# Usage: integration/haproxy-versions.sh [VERSION...]     (default: every version below)
#        integration/haproxy-versions.sh --path VERSION   (prints the wrapper's path only)
# Settings (environment):
#   LBAGENT_HAPROXY_ROOTS   where roots and wrappers go [/var/cache/lbagent/haproxy-roots]
#   LBAGENT_HAPROXY_SUITES  "VERSION=SUITE ..." [3.0=trixie 3.2=sid]
set -euo pipefail

ROOTS=${LBAGENT_HAPROXY_ROOTS:-/var/cache/lbagent/haproxy-roots}
SUITES=${LBAGENT_HAPROXY_SUITES:-3.0=trixie 3.2=sid}
export PATH="$PATH:/usr/sbin:/sbin"

fail() {
    printf 'haproxy-versions.sh: %s\n' "$*" >&2
    exit 1
}

suite_of() {
    local pair
    for pair in $SUITES; do
        if [ "${pair%%=*}" = "$1" ]; then
            printf '%s\n' "${pair#*=}"
            return 0
        fi
    done
    return 1
}

if [ "${1:-}" = --path ]; then
    [ $# -eq 2 ] || fail "usage: $0 --path VERSION"
    suite_of "$2" >/dev/null || fail "unknown version $2 (known: $SUITES)"
    [ -x "$ROOTS/bin/haproxy-$2" ] || fail "no wrapper for $2 yet: run $0 $2 first"
    printf '%s\n' "$ROOTS/bin/haproxy-$2"
    exit 0
fi

case "$ROOTS" in
/*) ;;
*) fail "LBAGENT_HAPROXY_ROOTS must be an absolute path: $ROOTS" ;;
esac
case "$ROOTS" in
*[!A-Za-z0-9/._-]*) fail "LBAGENT_HAPROXY_ROOTS may hold only letters, digits and / . _ -: $ROOTS" ;;
esac
for pair in $SUITES; do
    [[ $pair =~ ^[0-9]+\.[0-9]+=[a-z][a-z0-9-]*$ ]] ||
        fail "LBAGENT_HAPROXY_SUITES: \"$pair\" is not VERSION=SUITE (like 3.2=sid)"
done

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap and mount namespaces); run it with sudo"
# The wrapper swaps /usr only, so the machine's /lib, /lib64 and /bin must be links into /usr
# (merged /usr, as on every Debian since 12); otherwise the machine's own loader would run.
for d in /lib /lib64 /bin /sbin; do
    [ ! -e "$d" ] || [ -L "$d" ] || fail "$d is not a link into /usr (no merged /usr): the wrappers cannot work here"
done
command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install -y debootstrap)"
command -v unshare >/dev/null || fail "unshare (util-linux) is not installed"

versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    for pair in $SUITES; do versions+=("${pair%%=*}"); done
fi
for v in "${versions[@]}"; do
    suite_of "$v" >/dev/null || fail "unknown version $v (known: $SUITES)"
done

# The machine's own Debian archive, as apt resolved its sources: the first `deb` repository
# labelled plain "Debian" (not Debian-Security).
mirror() {
    apt-get indextargets --format '$(TARGET_OF) $(LABEL) $(REPO_URI)' 2>/dev/null |
        awk '$1 == "deb" && $2 == "Debian" { print $3; exit }'
}

mkdir -p "$ROOTS/bin"
# One preparation at a time: a concurrent second run waits and then finds the roots finished.
exec 9>"$ROOTS/.lock"
flock -w 1800 9 || fail "another haproxy-versions.sh has held $ROOTS/.lock for 30 minutes"

prepare_root() {
    local suite=$1 root=$ROOTS/$1
    if [ -f "$root/.lbagent-complete" ] && [ -x "$root/usr/sbin/haproxy" ]; then
        return 0
    fi
    local url
    url=$(mirror)
    [ -n "$url" ] || fail "found no Debian archive in apt's indexes (apt-get indextargets); run apt-get update first"
    # A root left half-made by an interrupted run is started again from nothing; debootstrap
    # killed midway can leave its /proc and /sys mounted in it.
    if [ -d "$root" ]; then
        awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$root"
    fi
    local log=$ROOTS/$suite.debootstrap.log
    echo "haproxy-versions.sh: debootstrap $suite with haproxy from $url (log: $log)" >&2
    if ! timeout 1800 debootstrap --variant=minbase --include=haproxy "$suite" "$root" "$url" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        fail "debootstrap $suite failed (log: $log)"
    fi
    [ -x "$root/usr/sbin/haproxy" ] || fail "debootstrap $suite installed no /usr/sbin/haproxy"
    touch "$root/.lbagent-complete"
}

write_wrapper() {
    local version=$1 root=$ROOTS/$2 wrapper=$ROOTS/bin/haproxy-$1
    local tmp
    tmp=$(mktemp "$wrapper.XXXXXX")
    cat >"$tmp" <<EOF
#!/bin/sh
# HAProxy $version: Debian $2's package, from $root (written by integration/haproxy-versions.sh).
# Runs it in a private mount namespace whose /usr is that root's; every other path is the
# caller's. exec all the way: the caller's child is HAProxy itself.
if [ "\$(id -u)" != 0 ]; then
    echo "haproxy-$version: needs root (it runs HAProxy in a mount namespace)" >&2
    exit 126
fi
# Under /usr the caller's files would be the root's, not its own.
case "\$(pwd -P)/" in
/usr/*)
    echo "haproxy-$version: cannot run from \$(pwd -P): /usr is the Debian root's in here" >&2
    exit 126
    ;;
esac
exec unshare --mount --propagation private -- /bin/sh -c '
    root=\$1
    shift
    mount --bind "\$root/etc/ld.so.cache" /etc/ld.so.cache &&
        mount --bind "\$root/usr" /usr || {
        echo "haproxy-$version: cannot bind ld.so.cache and /usr of \$root over those of the machine" >&2
        exit 126
    }
    exec /usr/sbin/haproxy "\$@"
' haproxy-$version "$root" "\$@"
EOF
    chmod 755 "$tmp"
    mv -f "$tmp" "$wrapper"
}

for v in "${versions[@]}"; do
    suite=$(suite_of "$v")
    prepare_root "$suite"
    write_wrapper "$v" "$suite"
    wrapper=$ROOTS/bin/haproxy-$v
    line=$("$wrapper" -v | sed -n 1p) || fail "$wrapper -v failed"
    # The root must hold the branch its name promises: sid moves on, and a wrapper called 3.2
    # that runs 3.3 would test the wrong thing without a word.
    case "$line" in
    "HAProxy version $v."*) ;;
    *) fail "Debian $suite's haproxy is not $v: $line (choose another suite with LBAGENT_HAPROXY_SUITES)" ;;
    esac
    printf '%s  %s\n' "$wrapper" "$line"
done
