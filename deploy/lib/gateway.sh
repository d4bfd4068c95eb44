# Steps that run ON the gateway (or against a directory standing in for its root),
# as root. deploy/install and deploy/rollback feed this file to `sh -s` over ssh,
# or run it locally with --root, so that the tested code is the code that ships.
# POSIX sh: a gateway image may have no bash.
#
# Inputs (environment):
#   ROOT            the gateway's root, "" for the real one
#   SRC             a directory holding meter-sync, meter-sync.service,
#                   meter-sync.env.example (install only)
#   SYSTEMCTL       1 to run systemctl (and journalctl), 0 when ROOT is not the
#                   live system (tests set 1 with a stand-in systemctl on PATH)
#   HEALTH_TIMEOUT  seconds to wait after the restart for a successful cycle;
#                   empty: the larger of 120 and 3 × SYNC_INTERVAL_SECONDS, plus
#                   UPLOAD_TIME_BUDGET_SECONDS (a first cycle may drain that long);
#                   0: no wait
#
# Exit status (install): 0 installed (and healthy, if it was restarted); 1 the new
# release did not become healthy and the previous release (binary and unit) was
# restored and restarted; 3 not healthy and nothing to roll back to (a first
# install, or a re-install of the release already there), left as it is.

set -eu

BIN_DIR="$ROOT/usr/local/bin"
BIN="$BIN_DIR/meter-sync"
PREV="$BIN_DIR/meter-sync.prev"
UNIT="$ROOT/etc/systemd/system/meter-sync.service"
# The unit the previous release was installed with. Not beside the unit: systemd
# would list a stray file in its unit directory.
LIB="$ROOT/usr/local/lib/meter-sync"
UNIT_PREV="$LIB/meter-sync.service.prev"
ETC="$ROOT/etc/meter-sync"
SERVICE=meter-sync.service

say() { printf '%s\n' "gateway: $*"; }

# Copies $1 to $2 with mode $3, owned by root when we are root, through a
# temporary name and a rename: a crash never leaves a half-written file.
put() {
    cp "$1" "$2.new"
    chmod "$3" "$2.new"
    if [ "$(id -u)" = 0 ]; then chown 0:0 "$2.new"; fi
    mv -f "$2.new" "$2"
}

# Creates a directory with mode $2. An existing one keeps its mode: an operator
# who closed /etc/meter-sync to 0700 keeps it closed.
dir() {
    [ -d "$1" ] && return 0
    mkdir -p "$1"
    chmod "$2" "$1"
}

# An empty secret file with mode 0600, unless one exists.
secret() {
    [ -e "$1" ] && return 0
    : > "$1.new"
    chmod 0600 "$1.new"
    mv "$1.new" "$1"
    say "created empty $1 (0600)${2:+: $2}"
}

# --- architecture ---------------------------------------------------------------

# The architecture of an ELF file's header: class (32/64-bit) and machine.
elf_arch() {
    # od prints the first 20 bytes as hex; e_ident[EI_CLASS] is byte 4, e_machine
    # (little-endian on every gateway CPU) bytes 18-19.
    hex=$(od -An -tx1 -N20 "$1" 2>/dev/null | tr -d ' \n')
    [ "$(printf '%s' "$hex" | cut -c1-8)" = 7f454c46 ] || { echo unknown; return; }
    class=$(printf '%s' "$hex" | cut -c9-10)
    machine=$(printf '%s' "$hex" | cut -c39-40)$(printf '%s' "$hex" | cut -c37-38)
    case $class:$machine in
        02:00b7) echo aarch64 ;;
        01:0028) echo armv7 ;;
        02:003e) echo x86_64 ;;
        *) echo "unknown(class $class, machine $machine)" ;;
    esac
}

# Follows $1's symbolic links inside ROOT (an absolute link target is taken
# relative to ROOT, as a chroot would).
resolve() {
    f=$1 n=0
    while [ -L "$f" ] && [ $n -lt 20 ]; do
        t=$(readlink "$f")
        case $t in
            /*) f="$ROOT$t" ;;
            *) f="$(dirname "$f")/$t" ;;
        esac
        n=$((n + 1))
    done
    printf '%s\n' "$f"
}

# Prints the userland's architecture (aarch64, armv7, x86_64): what the binary
# must be built for. Not `uname -m`: a 32-bit userland on a 64-bit kernel says
# aarch64 there and cannot run an aarch64 binary. dpkg knows on the live system;
# otherwise (and under ROOT) the ELF class and machine of /bin/sh tell.
do_arch() {
    if [ -z "$ROOT" ] && command -v dpkg >/dev/null 2>&1; then
        case $(dpkg --print-architecture) in
            arm64) echo aarch64; return ;;
            armhf) echo armv7; return ;;
            amd64) echo x86_64; return ;;
        esac
    fi
    elf_arch "$(resolve "$ROOT/bin/sh")"
}

# --- the health gate -----------------------------------------------------------

show() { systemctl show -p "$1" --value "$SERVICE" 2>/dev/null || true; }

# The number $1 is set to in meter-sync.env, if it is set (quotes allowed).
env_value() {
    sed -n "s/^[[:space:]]*$1=[\"']*\([0-9][0-9]*\).*/\1/p" "$ETC/meter-sync.env" 2>/dev/null | tail -1
}

health_timeout() {
    if [ -n "${HEALTH_TIMEOUT:-}" ]; then
        echo "$HEALTH_TIMEOUT"
        return
    fi
    interval=$(env_value SYNC_INTERVAL_SECONDS)
    budget=$(env_value UPLOAD_TIME_BUDGET_SECONDS)
    t=$((3 * ${interval:-60}))
    [ "$t" -ge 120 ] || t=120
    # A healthy release's first cycle may drain a backlog for the whole upload
    # budget before it can report "last cycle ok".
    echo $((t + ${budget:-300}))
}

# Waits for the first successful cycle of the daemon just restarted: its
# STATUS= reads "last cycle ok" (the daemon sets it after a cycle whose three
# phases succeeded and were written to sync_logs; systemd clears it when the
# service starts). Fails at once when the service fails or restarts (a crash),
# else after the timeout. Why STATUS= and not `meter-sync status --json`:
# status must run with the unit's environment, credentials and user (peer
# authentication on the local socket); systemd holds exactly those.
healthy() {
    limit=$(health_timeout)
    [ "$limit" -gt 0 ] || { say "health check skipped (HEALTH_TIMEOUT=0)"; return 0; }
    restarts=$(show NRestarts)
    start=$(date +%s)
    say "waiting up to $limit s for a successful cycle"
    while :; do
        state=$(show ActiveState)
        case $(show StatusText) in
            "last cycle ok"*)
                if [ "$state" = active ]; then
                    say "healthy: $(show StatusText)"
                    return 0
                fi
                ;;
        esac
        case $state in
            failed | inactive)
                WHY="the service is $state (exit status $(show ExecMainStatus))"
                return 1
                ;;
        esac
        if [ "$(show NRestarts)" != "$restarts" ]; then
            WHY="the service restarted (exit status $(show ExecMainStatus))"
            return 1
        fi
        if [ $(($(date +%s) - start)) -ge "$limit" ]; then
            WHY="no successful cycle within $limit s (last status: $(show StatusText))"
            return 1
        fi
        sleep 2
    done
}

journal_excerpt() {
    command -v journalctl >/dev/null 2>&1 || return 0
    say "last 50 lines of the journal of $SERVICE:"
    journalctl -u "$SERVICE" -n 50 --no-pager 2>&1 || true
}

# --- install and rollback ------------------------------------------------------

# Swaps the installed release (binary and unit) with the previous one, so that a
# second rollback rolls forward again.
swap_release() {
    [ -f "$PREV" ] || { say "no $PREV to roll back to"; exit 1; }
    mv -f "$BIN" "$BIN.swap"
    mv -f "$PREV" "$BIN"
    mv -f "$BIN.swap" "$PREV"
    if [ -f "$UNIT_PREV" ]; then
        mv -f "$UNIT" "$UNIT.swap"
        mv -f "$UNIT_PREV" "$UNIT"
        mv -f "$UNIT.swap" "$UNIT_PREV"
        say "rolled back: $BIN and $UNIT are the previous release's, the replaced ones $PREV and $UNIT_PREV"
    else
        say "rolled back: $BIN is the previous binary, the replaced one is $PREV (no previous unit kept: unit unchanged)"
    fi
}

restart() {
    systemctl daemon-reload
    systemctl restart "$SERVICE"
}

# Restarts onto the release just installed and gates on its health; rolls back
# when it is not healthy.
restart_if_configured() {
    [ "$SYSTEMCTL" = 1 ] || { say "not the live system: systemctl skipped"; return 0; }
    systemctl daemon-reload
    systemctl enable "$SERVICE" >/dev/null 2>&1 || say "systemctl enable $SERVICE failed"
    if [ "$CONFIGURED" != 1 ]; then
        say "enabled; fill in /etc/meter-sync/meter-sync.env and client-password, then: systemctl start meter-sync"
        return 0
    fi
    WHY=
    if [ "$CHANGED" != 1 ] && [ "$(show ActiveState)" = active ]; then
        # A re-run of a rollout: this release already runs here. Its health is
        # still checked, but a restart would interrupt a drain for nothing (and,
        # fleet-wide, restart every gateway the first run upgraded).
        say "this release is already running: not restarted"
        if healthy; then
            say "meter-sync healthy"
            return 0
        fi
    elif systemctl restart "$SERVICE"; then
        if healthy; then
            say "meter-sync restarted and healthy"
            return 0
        fi
    else
        WHY="systemctl restart failed (exit status $(show ExecMainStatus))"
    fi
    say "the new release is not healthy: $WHY"
    journal_excerpt
    if [ "$CHANGED" != 1 ] || [ ! -f "$PREV" ]; then
        say "nothing to roll back to; left as it is"
        exit 3
    fi
    swap_release
    if restart; then
        say "previous release restarted: $(show ActiveState)"
    else
        say "previous release did not start either"
        journal_excerpt
    fi
    exit 1
}

do_install() {
    dir "$BIN_DIR" 0755
    dir "$ROOT/etc/systemd/system" 0755
    dir "$LIB" 0755
    dir "$ETC" 0755
    CONFIGURED=0
    [ -s "$ETC/meter-sync.env" ] && CONFIGURED=1
    CHANGED=0
    if [ -f "$BIN" ] && cmp -s "$BIN" "$SRC/meter-sync" &&
        [ -f "$UNIT" ] && cmp -s "$UNIT" "$SRC/meter-sync.service"; then
        # Re-running the same install keeps the previous release to roll back to.
        say "binary and unit unchanged"
    else
        CHANGED=1
        if [ -f "$BIN" ]; then
            put "$BIN" "$PREV" 0755
            if [ -f "$UNIT" ]; then put "$UNIT" "$UNIT_PREV" 0644; else rm -f "$UNIT_PREV"; fi
            say "previous release kept as $PREV and $UNIT_PREV"
        fi
        put "$SRC/meter-sync" "$BIN" 0755
        put "$SRC/meter-sync.service" "$UNIT" 0644
        say "installed $BIN and $UNIT"
    fi
    if [ "$SYSTEMCTL" = 1 ]; then
        # Runs on the gateway: proves the binary fits its architecture before the
        # daemon is restarted onto it.
        "$BIN" --version >/dev/null || {
            say "new binary does not run here"
            if [ "$CHANGED" = 1 ] && [ -f "$PREV" ]; then swap_release; fi
            exit 1
        }
    fi
    put "$SRC/meter-sync.env.example" "$ETC/meter-sync.env.example" 0644
    # The operator's files are never overwritten; they are created with safe modes.
    if [ ! -e "$ETC/meter-sync.env" ]; then
        put "$SRC/meter-sync.env.example" "$ETC/meter-sync.env" 0640
        say "created $ETC/meter-sync.env from the example: edit it"
    fi
    # The unit loads both as credentials (LoadCredential=), which fails on a
    # missing file: an empty one means "no password" (peer authentication).
    secret "$ETC/client-password" "put the central password in it"
    secret "$ETC/sync-password" "the local password, if the local database wants one"
    if [ -z "$ROOT" ] && ! id meter-sync >/dev/null 2>&1; then
        # A static user gives pg_hba peer authentication a stable name (the unit
        # would otherwise allocate a dynamic one).
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin meter-sync
        say "created system user meter-sync"
    fi
    restart_if_configured
}

do_rollback() {
    swap_release
    [ "$SYSTEMCTL" = 1 ] || { say "not the live system: systemctl skipped"; return 0; }
    restart || {
        journal_excerpt
        say "meter-sync did not start after the rollback"
        exit 1
    }
    say "meter-sync restarted: $(show ActiveState)"
}
