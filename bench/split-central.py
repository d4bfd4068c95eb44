#!/usr/bin/env python3
"""Splits the samples of central's COPY backends by what they were doing.

Record a drain benchmark with call graphs, then run this on the samples:

    perf record -a -F 250 --call-graph dwarf,8192 -o central.data -- \
        env BENCH_ROWS=300000 BENCH_BATCHES=1000,5000 BENCH_REPS=2 bench/run drain
    perf script -i central.data --comm postgres -F pid,ip,sym > central.txt
    bench/split-central.py central.txt

One line per backend that spent most of its samples in COPY FROM, in the order
they started: in a drain round that is the pipe, then each batch size, and one
more pipe run at the end. Each sample goes to the first bucket whose functions
are on its stack (docs/upload.md, "Central's backend split by caller").
"""
import collections
import sys

BUCKETS = [
    ("send", ("__libc_send", "secure_write", "SSL_write", "socket_flush", "internal_flush")),
    ("recv", ("secure_read", "SSL_read", "__libc_recv", "pq_recvbuf")),
    ("slots", ("table_slot_create", "MakeTupleTableSlot", "ExecDropSingleTupleTableSlot",
               "ExecResetTupleTable")),
    ("statements", ("BeginCopyFrom", "EndCopyFrom", "CommitTransactionCommand",
                    "StartTransactionCommand", "pg_parse_query", "pg_analyze_and_rewrite",
                    "exec_simple_query", "set_config_option")),
    ("rows", ("CopyFrom",)),
]


def samples(path):
    pid, stack = None, []
    for line in open(path):
        if not line.strip():
            if pid is not None:
                yield pid, stack
            pid, stack = None, []
        elif not line.startswith("\t"):
            pid, stack = int(line.split()[0]), []
        else:
            parts = line.split(None, 1)
            stack.append(parts[1].strip() if len(parts) > 1 else parts[0])
    if pid is not None:
        yield pid, stack


def bucket(stack):
    for name, functions in BUCKETS:
        if any(f in frame for frame in stack for f in functions):
            return name
    return "unattributed"


def main():
    by_pid = collections.defaultdict(collections.Counter)
    for pid, stack in samples(sys.argv[1]):
        by_pid[pid][bucket(stack)] += 1
    names = [b for b, _ in BUCKETS] + ["unattributed"]
    print("pid".ljust(8) + "all".rjust(7) + "".join(n.rjust(13) for n in names))
    for pid in sorted(by_pid):
        c = by_pid[pid]
        total = sum(c.values())
        # The backends of the daemon's other work and of the benchmark's checks.
        if total < 100 or c["rows"] < total * 0.5:
            continue
        print(f"{pid:<8}{total:7d}" + "".join(f"{c[n]:13d}" for n in names))


if __name__ == "__main__":
    main()
