# Shared by deploy/install and deploy/rollback on the operator's machine: argument
# parsing and running lib/gateway.sh locally (--root) or on a gateway over ssh.
# The ssh command comes from $SSH (e.g. SSH="ssh -p 2222 -i key"), so that jump
# hosts and keys stay in the operator's hands (or ~/.ssh/config).

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$DEPLOY_DIR/.." && pwd)
SSH=${SSH:-ssh}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# run_on_gateway ACTION HOST ROOT SRC: HOST empty means this machine. With a HOST
# and no ROOT, the live system of the gateway is changed and systemctl is used.
run_on_gateway() {
    local action=$1 host=$2 root=$3 src=$4 systemctl=0
    if [ -z "$host" ]; then
        ROOT=$root SRC=$src SYSTEMCTL=0 sh -s < <(cat "$DEPLOY_DIR/lib/gateway.sh"; echo "do_$action")
        return
    fi
    [ -z "$root" ] && systemctl=1
    local q_root q_src
    q_root=$(printf '%q' "$root")
    q_src=$(printf '%q' "$src")
    # sudo only when the ssh user is not root; `env` carries the inputs across sudo.
    # shellcheck disable=SC2029 # expanded here on purpose
    $SSH "$host" "if [ \"\$(id -u)\" = 0 ]; then S=; else S=sudo; fi; \$S env ROOT=$q_root SRC=$q_src SYSTEMCTL=$systemctl sh -s" \
        < <(cat "$DEPLOY_DIR/lib/gateway.sh"; echo "do_$action")
}
