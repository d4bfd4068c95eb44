# Shared by deploy/install and deploy/rollback on the operator's machine: argument
# parsing and running lib/gateway.sh locally (--root) or on a gateway over ssh.
# The ssh command comes from $SSH (e.g. SSH="ssh -p 2222 -i key"), so that jump
# hosts and keys stay in the operator's hands (or ~/.ssh/config).

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$DEPLOY_DIR/.." && pwd)
SSH=${SSH:-ssh}
# Set by --systemctl: run systemctl although ROOT is not the live system (tests
# put a stand-in systemctl on PATH).
FORCE_SYSTEMCTL=${FORCE_SYSTEMCTL:-0}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# run_on_gateway ACTION HOST ROOT SRC: HOST empty means this machine. With a HOST
# and no ROOT, the live system of the gateway is changed and systemctl is used.
# Prints what the gateway says; returns its exit status.
run_on_gateway() {
    local action=$1 host=$2 root=$3 src=$4 systemctl=$FORCE_SYSTEMCTL
    if [ -z "$host" ]; then
        ROOT=$root SRC=$src SYSTEMCTL=$systemctl HEALTH_TIMEOUT=$HEALTH_TIMEOUT \
            sh -s < <(cat "$DEPLOY_DIR/lib/gateway.sh"; echo "do_$action")
        return
    fi
    [ -z "$root" ] && systemctl=1
    local q_root q_src q_health
    q_root=$(printf '%q' "$root")
    q_src=$(printf '%q' "$src")
    q_health=$(printf '%q' "$HEALTH_TIMEOUT")
    # sudo only when the ssh user is not root; `env` carries the inputs across sudo.
    # shellcheck disable=SC2029 # expanded here on purpose
    $SSH "$host" "if [ \"\$(id -u)\" = 0 ]; then S=; else S=sudo; fi; \$S env ROOT=$q_root SRC=$q_src SYSTEMCTL=$systemctl HEALTH_TIMEOUT=$q_health sh -s" \
        < <(cat "$DEPLOY_DIR/lib/gateway.sh"; echo "do_$action")
}
