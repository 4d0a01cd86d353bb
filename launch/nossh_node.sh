#!/usr/bin/env bash
# A DeepSpeed stage (pretrain or hypernet) on many nodes without ssh, pdsh or mpirun: start this on EVERY node (by
# hand, from a container orchestrator, or `srun` once per node), with that node's index in the hostfile.
#   launch/nossh_node.sh pretrain NODE_RANK my.yaml launch/hostfile [key=value ...]
# Node 0 must be the hostfile's first host: it runs `hyperofa <stage>` with <stage>.launcher=nossh (the checks, the
# job file, its own ranks with global rank 0, and for pretrain the export and the manifest). Every other node
# waits until rank 0's rendezvous port (<stage>.master_port, default 29500, on the first host) accepts
# connections, which happens only once node 0 has written this launch's job.json, then starts its own ranks with
# the same DeepSpeed launcher command and its --node_rank; it writes nothing itself.
# Set GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU) on every node to the interface the nodes share.
# HYPEROFA_NODE_WAIT_S: how long a node waits for rank 0 (default 1800 s) before giving up with one line, exit 2.
# HYPEROFA_NODE_PRINT=1: print the command this node would run, and exit.
set -euo pipefail
STAGE=${1:?stage: pretrain or hypernet}
NODE_RANK=${2:?node rank, 0 on the first host of the hostfile}
CONFIG=${3:?config yaml}
HOSTFILE=${4:?hostfile}
shift 4
case "$STAGE" in
    pretrain|hypernet) ;;
    *) echo "launch/nossh_node.sh: error: stage must be pretrain or hypernet, got '$STAGE'" >&2; exit 2 ;;
esac
if [ "$NODE_RANK" = 0 ] && [ -z "${HYPEROFA_NODE_PRINT:-}" ]; then
    exec hyperofa "$STAGE" --config "$CONFIG" --hostfile "$HOSTFILE" --launcher nossh "$@"
fi
exec python - "$STAGE" "$NODE_RANK" "$CONFIG" "$HOSTFILE" "$@" <<'PY'
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from hyperofa_dist.config import load_config
from hyperofa_dist.errors import HyperofaError
from hyperofa_dist.formats import hypernet as hypernet_format
from hyperofa_dist.formats import pretrain as pretrain_format
from hyperofa_dist.formats.jobdir import JOB
from hyperofa_dist.runtime.launch import DEFAULT_MULTI_NODE_PORT, launch_command, read_hostfile

stage, node_rank, config_file, hostfile, *overrides = sys.argv[1:]
try:
    config = load_config(config_file, [f"{stage}.hostfile={hostfile}", f"{stage}.launcher=nossh", *overrides])
    if stage == "pretrain":
        from hyperofa_dist.pretrain.stage import TARGET

        section = config.pretrain
        job, extra = pretrain_format.stage_of(config.run_dir, section.method).path / JOB, ()
    else:
        from hyperofa_dist.hypernet.stage import TARGET

        section = config.hypernet
        job, extra = hypernet_format.stage_of(config.run_dir).path / JOB, ("--resume",) if section.resume else ()
    hosts = read_hostfile(Path(hostfile), f"{stage}.hostfile")[: section.num_nodes or None]
    if not node_rank.isdigit() or int(node_rank) >= len(hosts):
        raise HyperofaError(f"node rank {node_rank} is not a node of {hostfile} (0 .. {len(hosts) - 1} here)")
    cmd = launch_command(section, job, TARGET, extra=extra, node_rank=int(node_rank))
    if os.environ.get("HYPEROFA_NODE_PRINT"):
        print(shlex.join(cmd))
        sys.exit(0)
    master, port = hosts[0][0], section.master_port or DEFAULT_MULTI_NODE_PORT
    wait = float(os.environ.get("HYPEROFA_NODE_WAIT_S", "1800"))
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.create_connection((master, port), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise HyperofaError(f"rank 0 never listened on {master}:{port} in {wait:.0f}s; is node 0 "
                                    f"(launch/nossh_node.sh {stage} 0 ...) running?") from None
            time.sleep(0.5)
except HyperofaError as exc:
    print(f"hyperofa {stage} (node {node_rank}): error: {exc}", file=sys.stderr)
    sys.exit(2)
print(f"hyperofa {stage} (node {node_rank}): rank 0 is up at {master}:{port}; {shlex.join(cmd)}", file=sys.stderr,
      flush=True)
os.execv(cmd[0], cmd)  # the launcher replaces this process: a signal to the node's command reaches it
PY
