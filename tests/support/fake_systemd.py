#!/usr/bin/env python3
"""A stand-in for systemctl and journalctl, for deploy/install's health gate in
tests/shipping.rs (the real systemd is tests/systemd.rs's, behind its knob).

Installed on PATH as both `systemctl` and `journalctl` (symlinks to this file).
It manages one service, meter-sync.service, from the unit under
$FAKE_SYSTEMD_ROOT/etc/systemd/system as systemd would for what the health gate
looks at: ExecStartPre and ExecStart (under the root), EnvironmentFile=, Environment=,
LoadCredential= (copied to a credentials directory, %d expanded), Type=notify
(restart returns once READY=1 arrived, fails if the process exits first),
STATUS= (StatusText, cleared at start), ExecMainStatus, NRestarts (always 0: no
Restart= emulation). Output goes to a journal file that journalctl tails.
State lives in $FAKE_SYSTEMD_DIR.
"""

import os
import signal
import socket
import subprocess
import sys
import time

STATE = os.environ["FAKE_SYSTEMD_DIR"]
ROOT = os.environ.get("FAKE_SYSTEMD_ROOT", "")
UNIT = os.path.join(ROOT + "/etc/systemd/system", "meter-sync.service")


def path(name):
    return os.path.join(STATE, name)


def read(name, default=""):
    try:
        with open(path(name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return default


def write(name, value):
    tmp = path(name + ".tmp")
    with open(tmp, "w") as f:
        f.write(value)
    os.replace(tmp, path(name))


def log_call(args):
    with open(path("calls"), "a") as f:
        f.write(" ".join(args) + "\n")


def unit_directives():
    d = {}
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;[" or "=" not in line:
                continue
            k, v = line.split("=", 1)
            d.setdefault(k, []).append(v)
    return d


def env_file(p):
    env = {}
    optional = p.startswith("-")
    p = ROOT + p.lstrip("-")
    try:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line or line[0] in "#;" or "=" not in line:
                    continue
                k, v = line.split("=", 1)
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
                    v = v[1:-1]
                env[k.strip()] = v
    except FileNotFoundError:
        if not optional:
            raise
    return env


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, ValueError):
        return False


def stop():
    pid = int(read("mainpid", "0") or 0)
    if pid and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 45
        while alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    sup = int(read("supervisor", "0") or 0)
    deadline = time.time() + 5
    while sup and alive(sup) and time.time() < deadline:
        time.sleep(0.05)
    if read("state") in ("active", "activating"):
        write("state", "inactive")


def supervise(argv, env):
    """Runs in the detached supervisor: starts the service, follows its notify
    messages, records how it ended."""
    sock_path = path("notify.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.1)
    env["NOTIFY_SOCKET"] = sock_path
    journal = open(path("journal"), "a")
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=journal, stderr=journal)
    write("mainpid", str(child.pid))
    while True:
        try:
            msg = sock.recv(65536).decode(errors="replace")
            for line in msg.splitlines():
                if line == "READY=1":
                    write("state", "active")
                elif line.startswith("STATUS="):
                    write("status", line[len("STATUS="):])
        except socket.timeout:
            pass
        code = child.poll()
        if code is not None:
            write("exit", str(code if code >= 0 else 128 - code))
            write("state", "inactive" if code == 0 else "failed")
            write("mainpid", "0")
            return


def start():
    d = unit_directives()
    argv = d["ExecStart"][0].split()
    argv[0] = ROOT + argv[0]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for p in d.get("EnvironmentFile", []):
        env.update(env_file(p))
    creds = path("credentials")
    os.makedirs(creds, exist_ok=True)
    for c in d.get("LoadCredential", []):
        name, src = c.split(":", 1)
        with open(ROOT + src, "rb") as f:
            data = f.read()
        with open(os.path.join(creds, name), "wb") as f:
            f.write(data)
    env["CREDENTIALS_DIRECTORY"] = creds
    for e in d.get("Environment", []):
        k, v = e.split("=", 1)
        env[k] = v.replace("%d", creds)
    write("state", "activating")
    write("status", "")
    write("exit", "")
    # ExecStartPre= runs to its end first, with the same environment; "-" ignores
    # its failure.
    for pre in d.get("ExecStartPre", []):
        ignore = pre.startswith("-")
        pre_argv = pre.lstrip("-").split()
        pre_argv[0] = ROOT + pre_argv[0]
        with open(path("journal"), "a") as journal:
            code = subprocess.call(pre_argv, env=env, stdin=subprocess.DEVNULL, stdout=journal, stderr=journal)
        if code != 0 and not ignore:
            write("exit", str(code))
            write("state", "failed")
            sys.stderr.write("Job for meter-sync.service failed (fake systemd: ExecStartPre).\n")
            return 1
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            write("supervisor", str(os.getpid()))
            try:
                supervise(argv, env)
            finally:
                os._exit(0)
        os._exit(0)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = read("state")
        if state == "active":
            return 0
        if state in ("failed", "inactive"):
            sys.stderr.write("Job for meter-sync.service failed (fake systemd).\n")
            return 1
        time.sleep(0.05)
    return 1


def systemctl(args):
    log_call(["systemctl"] + args)
    words = [a for a in args if not a.startswith("-")]
    cmd = words[0] if words else ""
    if cmd in ("daemon-reload", "enable"):
        return 0
    if cmd == "restart":
        stop()
        return start()
    if cmd == "start":
        return 0 if read("state") == "active" else start()
    if cmd == "stop":
        stop()
        return 0
    if cmd == "is-active":
        state = read("state", "inactive")
        if "--quiet" not in args:
            print(state)
        return 0 if state == "active" else 3
    if cmd == "show":
        prop = args[args.index("-p") + 1]
        value = {
            "ActiveState": read("state", "inactive"),
            "StatusText": read("status"),
            "NRestarts": "0",
            "ExecMainStatus": read("exit", "0") or "0",
            "MainPID": read("mainpid", "0"),
        }.get(prop, "")
        print(value if "--value" in args else f"{prop}={value}")
        return 0
    sys.stderr.write(f"fake systemctl: unsupported {args}\n")
    return 1


def journalctl(args):
    log_call(["journalctl"] + args)
    n = int(args[args.index("-n") + 1]) if "-n" in args else 10
    try:
        with open(path("journal")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines[-n:]:
        print(line)
    return 0


if __name__ == "__main__":
    me = os.path.basename(sys.argv[0])
    sys.exit(journalctl(sys.argv[1:]) if me == "journalctl" else systemctl(sys.argv[1:]))
