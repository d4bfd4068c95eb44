# Steps that run ON the gateway (or against a directory standing in for its root),
# as root. deploy/install and deploy/rollback feed this file to `sh -s` over ssh,
# or run it locally with --root, so that the tested code is the code that ships.
# POSIX sh: a gateway image may have no bash.
#
# Inputs (environment): ROOT (the gateway's root, "" for the real one), SRC (a
# directory holding meter-sync, meter-sync.service, meter-sync.env.example),
# SYSTEMCTL (1 to run systemctl, 0 when ROOT is not the live system).

set -eu

BIN_DIR="$ROOT/usr/local/bin"
BIN="$BIN_DIR/meter-sync"
PREV="$BIN_DIR/meter-sync.prev"
UNIT="$ROOT/etc/systemd/system/meter-sync.service"
ETC="$ROOT/etc/meter-sync"

say() { printf '%s\n' "gateway: $*"; }

# Copies $1 to $2 with mode $3, owned by root when we are root, through a
# temporary name and a rename: a crash never leaves a half-written binary.
put() {
    cp "$1" "$2.new"
    chmod "$3" "$2.new"
    if [ "$(id -u)" = 0 ]; then chown 0:0 "$2.new"; fi
    mv -f "$2.new" "$2"
}

dir() {
    mkdir -p "$1"
    chmod "$2" "$1"
}

# The daemon is (re)started only once it has a configuration: on a first install
# the operator still has to fill in meter-sync.env and client-password.
restart_if_configured() {
    [ "$SYSTEMCTL" = 1 ] || { say "not the live system: systemctl skipped"; return 0; }
    systemctl daemon-reload
    systemctl enable meter-sync.service >/dev/null 2>&1
    if [ "$CONFIGURED" = 1 ]; then
        systemctl restart meter-sync.service
        # Type=notify: restart returns once READY=1 arrived, or fails.
        systemctl is-active --quiet meter-sync.service || {
            journalctl -u meter-sync.service -n 20 --no-pager || true
            say "meter-sync did not become active"
            return 1
        }
        say "meter-sync restarted and active"
    else
        say "enabled; fill in /etc/meter-sync/meter-sync.env and client-password, then: systemctl start meter-sync"
    fi
}

do_install() {
    dir "$BIN_DIR" 0755
    dir "$ROOT/etc/systemd/system" 0755
    dir "$ETC" 0755
    CONFIGURED=0
    [ -s "$ETC/meter-sync.env" ] && CONFIGURED=1
    if [ -f "$BIN" ] && cmp -s "$BIN" "$SRC/meter-sync"; then
        # Re-running the same install keeps the previous binary to roll back to.
        say "binary unchanged"
    else
        if [ -f "$BIN" ]; then
            put "$BIN" "$PREV" 0755
            say "previous binary kept as $PREV"
        fi
        put "$SRC/meter-sync" "$BIN" 0755
        say "installed $BIN"
    fi
    if [ "$SYSTEMCTL" = 1 ]; then
        # Runs on the gateway: proves the binary fits its architecture before the
        # daemon is restarted onto it.
        "$BIN" --version >/dev/null || { say "new binary does not run here"; do_rollback_files; exit 1; }
    fi
    put "$SRC/meter-sync.service" "$UNIT" 0644
    put "$SRC/meter-sync.env.example" "$ETC/meter-sync.env.example" 0644
    # The operator's files are never overwritten; they are created with safe modes.
    if [ ! -e "$ETC/meter-sync.env" ]; then
        put "$SRC/meter-sync.env.example" "$ETC/meter-sync.env" 0640
        say "created $ETC/meter-sync.env from the example: edit it"
    fi
    if [ ! -e "$ETC/client-password" ]; then
        : > "$ETC/client-password.new"
        chmod 0600 "$ETC/client-password.new"
        mv "$ETC/client-password.new" "$ETC/client-password"
        say "created empty $ETC/client-password (0600): put the central password in it"
    fi
    if [ "$SYSTEMCTL" = 1 ] && ! id meter-sync >/dev/null 2>&1; then
        # A static user gives pg_hba peer authentication and the metrics directory
        # a stable name and uid (the unit would otherwise allocate a dynamic one).
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin meter-sync
        say "created system user meter-sync"
    fi
    restart_if_configured
}

# Swaps meter-sync and meter-sync.prev, so a second rollback rolls forward again.
do_rollback_files() {
    [ -f "$PREV" ] || { say "no $PREV to roll back to"; exit 1; }
    mv -f "$BIN" "$BIN.swap"
    mv -f "$PREV" "$BIN"
    mv -f "$BIN.swap" "$PREV"
    say "rolled back: $BIN is the previous binary, the replaced one is $PREV"
}

do_rollback() {
    do_rollback_files
    CONFIGURED=1
    restart_if_configured
}
