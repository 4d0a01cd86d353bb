#!/usr/bin/env python3
"""Two-node drills on one machine: two network namespaces joined by a veth pair play two nodes.

    python launch/multinode_drill.py ray        [--work DIR] [--report FILE]
    python launch/multinode_drill.py deepspeed  [--work DIR] [--report FILE]

Node A is namespace `hyod<pid>a` with 10.77.0.1, node B is `hyod<pid>b` with 10.77.0.2; everything a node runs
is started inside its namespace, so the nodes reach each other only over the veth link, by address, and their
ports never collide with anything else on the machine. Both share this machine's kernel, cores and filesystem
(the "shared filesystem" a real cluster mounts on every node).

ray        a Ray cluster: `ray start --head` in A with no CPU (the driver's node, as a head node often is),
           `ray start --address 10.77.0.1:6379` in B with 2 CPUs; `hyperofa prepare` and `hyperofa mapping` run in
           A with ray.address set, so every task must run on B and its results cross the link to the driver (Ray
           places a task only where its CPU is: a guarantee, where spreading short tasks over nodes with free CPUs
           is best effort even with SPREAD, and once ran 9 of 9 mapping tasks on one node); Ray's state API says
           which node ran each task; both stages' outputs must be byte-identical to a single-node run (local Ray).
deepspeed  `hyperofa pretrain` over both nodes with launch/nossh_node.sh (DeepSpeed --no_ssh, one gloo rank
           per node, a hostfile naming node-a and node-b); node B is killed (SIGKILL of every process in its
           namespace) after the step-4 checkpoint; both nodes resume; the losses must equal an uninterrupted
           single-node 2-rank run's within 1e-4 (the single-node resume test's tolerance).

Prints one JSON report (wall times, what each node ran, the checks) and exits 0 when every check passed, 1 when
one failed, 2 when the drill could not run (not root, no `ip netns`). Every namespace, veth, Ray node and
process the drill starts is removed on the way out, also on failure, SIGINT or SIGTERM; namespaces a killed
drill left behind (its pid gone) are removed at the next start. Needs root (CAP_SYS_ADMIN) and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from hyperofa_dist.formats.jobdir import latest_tag
from hyperofa_dist.formats.pretrain import TRAIN_LOG
from hyperofa_dist.formats.rundir import MANIFEST

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREFIX = "hyod"  # namespaces hyod<pid>a / hyod<pid>b; veths carry the same names (<= 15 characters)
ADDRS = ("10.77.0.1", "10.77.0.2")
HOSTNAMES = ("node-a", "node-b")  # resolvable inside the namespaces only (/etc/netns/<ns>/hosts, see TwoNodes.up)
RAY_PORT = 6379
DASHBOARD_PORT = 8265
LOSS_TOLERANCE = 1e-4  # tests/test_pretrain_job.py: resumed losses vs uninterrupted


class DrillError(Exception):
    """The drill could not run (no namespaces); not a failed check."""


# --- two nodes --------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def namespace_pids(ns: str) -> list[int]:
    """Live processes whose network namespace is `ns` (what `ip netns pids` lists, zombies left out)."""
    try:
        inode = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino != inode:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_namespace(ns: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """SIGKILL every process in the namespace (a node losing power) until none is left; what was killed."""
    killed: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in namespace_pids(ns) if p != os.getpid()]
        if not pids:
            return list(killed.values())
        for pid in pids:
            record = {"pid": pid, "cmd": _cmdline(pid)[:160], "rank": _environ(pid).get("RANK")}
            try:
                os.kill(pid, signal.SIGKILL)
                killed.setdefault(pid, record)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in namespace {ns} survive SIGKILL: {pids}")
        time.sleep(0.1)


def sweep_stale() -> list[str]:
    """Remove drill namespaces whose drill process is gone (a drill killed before its clean-up ran)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"^({PREFIX}(?:probe)?(\d+)[ab]?)\b", line.strip())
        if not match:
            continue
        owner = int(match.group(2))
        if owner != os.getpid() and "multinode_drill" in _cmdline(owner):
            continue  # another drill, still running
        kill_namespace(match.group(1))
        _ip("netns", "del", match.group(1), check=False)
        removed.append(match.group(1))
    live = set(_ip("netns", "list", check=False).stdout.split())
    for etc in Path("/etc/netns").glob(f"{PREFIX}*"):
        if etc.name not in live:
            shutil.rmtree(etc, ignore_errors=True)
    return removed


def check_namespaces() -> None:
    """Before any work: this machine can make a network namespace (root, iproute2, CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        raise DrillError("needs root: network namespaces are created with `ip netns add`")
    if shutil.which("ip") is None:
        raise DrillError("needs iproute2 (`ip`)")
    probe = f"{PREFIX}probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise DrillError(f"cannot create a network namespace: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Node:
    index: int
    ns: str
    addr: str
    cores: Optional[list[int]] = None  # the node's own cores (taskset), when the machine has one per node

    @property
    def veth(self) -> str:
        return self.ns

    @property
    def label(self) -> str:
        return "AB"[self.index]


@dataclass
class TwoNodes:
    """Two namespaces and a veth pair; processes started in them; all of it removed by `down`."""

    work: Path
    nodes: list[Node] = field(default_factory=list)
    procs: list[tuple[Node, subprocess.Popen, Any]] = field(default_factory=list)

    def up(self) -> None:
        sweep_stale()
        base = f"{PREFIX}{os.getpid()}"
        # Two nodes do not share cores: each gets half of ours (taskset), which the job's thread count follows.
        cores = sorted(os.sched_getaffinity(0))
        halves = [cores[: len(cores) // 2], cores[len(cores) // 2 :]] if len(cores) >= 2 and shutil.which("taskset") \
            else [None, None]
        self.nodes = [Node(i, f"{base}{'ab'[i]}", ADDRS[i], halves[i]) for i in range(2)]
        try:
            for node in self.nodes:
                _ip("netns", "add", node.ns)
        except subprocess.CalledProcessError as exc:
            raise DrillError(f"cannot create a network namespace: {exc.stderr.strip()}") from None
        a, b = self.nodes
        _ip("link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
        # Both forms of each address: the rendezvous store listens on IPv6 and sees peers as ::ffff:10.77.0.x.
        hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n::ffff:{addr} {name}\n"
                                                   for addr, name in zip(ADDRS, HOSTNAMES))
        for node in self.nodes:
            # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc: the nodes know each other by name, as on a
            # cluster, and a peer's address resolves (c10d warns on every connection it cannot name otherwise).
            (Path("/etc/netns") / node.ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / node.ns / "hosts").write_text(hosts)
            _ip("link", "set", node.veth, "netns", node.ns)
            _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.veth)
            _ip("-n", node.ns, "link", "set", "lo", "up")
            _ip("-n", node.ns, "link", "set", node.veth, "up")

    def down(self) -> None:
        for _, proc, log in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
        for node in self.nodes:
            kill_namespace(node.ns)
            _ip("netns", "del", node.ns, check=False)  # takes its end of the veth pair, and so the pair, with it
            shutil.rmtree(Path("/etc/netns") / node.ns, ignore_errors=True)

    def popen(self, node: Node, argv: list[str], name: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "wb")
        pin = ["taskset", "-c", ",".join(map(str, node.cores))] if node.cores else []
        proc = subprocess.Popen([*pin, "ip", "netns", "exec", node.ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        self.procs.append((node, proc, log))
        return proc

    def run(self, node: Node, argv: list[str], name: str, env: Optional[dict[str, str]] = None,
            timeout: float = 300) -> int:
        proc = self.popen(node, argv, name, env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"{name} did not finish in {timeout:.0f}s (log: {self.work / 'logs' / name}.log)")

    def link_bytes(self, node: Node) -> dict[str, int]:
        info = json.loads(_ip("-j", "-s", "-n", node.ns, "link", "show", "dev", node.veth).stdout)[0]
        stats = info.get("stats64") or info.get("stats")
        return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}


class ProcessWatch:
    """Samples what runs in each namespace every 0.3 s: the record of what each node ran."""

    def __init__(self, cluster: TwoNodes):
        self.cluster = cluster
        # node -> (pid, command line) -> RANK: a process that execs (the node script becoming the launcher) counts
        # once per program it was
        self.seen: dict[str, dict[tuple[int, str], Optional[str]]] = {n.label: {} for n in cluster.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for node in self.cluster.nodes:
                for pid in namespace_pids(node.ns):
                    cmd = _cmdline(pid)
                    if cmd and (pid, cmd) not in self.seen[node.label]:
                        self.seen[node.label][(pid, cmd)] = _environ(pid).get("RANK")
            self._stop.wait(0.3)

    def __enter__(self) -> "ProcessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, patterns: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Per node: how many processes matched each pattern, and the global ranks seen."""
        out = {}
        for label, procs in self.seen.items():
            counts = {name: sum(1 for _, cmd in procs if re.search(rx, cmd)) for name, rx in patterns.items()}
            ranks = sorted({int(rank) for (_, cmd), rank in procs.items()
                            if rank is not None and re.search(r"-m hyperofa_dist\.pretrain\.train", cmd)})
            node = next(n for n in self.cluster.nodes if n.label == label)
            out[label] = {"address": node.addr, "cores": node.cores, "processes": counts, "ranks": ranks}
        return out


@contextmanager
def two_nodes(work: Path) -> Iterator[TwoNodes]:
    cluster = TwoNodes(work)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


# --- shared helpers ---------------------------------------------------------------------------------------


def base_env(work: Path) -> dict[str, str]:
    """The environment of everything the drill starts: this Python as `python` and `hyperofa` on PATH (as an
    activated virtualenv would have them), and nothing else of its bin directory: a `ninja` there other than the
    system's makes DeepSpeed rebuild its CPU op (each ninja version rejects the other's build log)."""
    env = dict(os.environ)
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, command in (("python", f'exec {sys.executable} "$@"'),
                          ("hyperofa", f'exec {sys.executable} -m hyperofa_dist.cli "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    # A checkout run without installing it still reaches every process (drivers, Ray workers, ranks).
    env["PYTHONPATH"] = f"{REPO}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def hyperofa(*args: str) -> list[str]:
    return [sys.executable, "-m", "hyperofa_dist.cli", *args]


class Reference(threading.Thread):
    """Commands run one after another beside the two-node part (the single-node reference: a different machine
    in spirit, and its start-up waits overlap the cluster's); `finish` waits and raises if one failed."""

    def __init__(self, steps: list[tuple[str, list[str]]], logs: Path, env: dict[str, str]):
        super().__init__(daemon=True)
        self.steps, self.logs, self.env = steps, logs, env
        self.times: dict[str, float] = {}
        self.failed: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.stopped = False

    def run(self) -> None:
        for name, argv in self.steps:
            if self.stopped:
                return
            started = time.perf_counter()
            with open(self.logs / f"{name}.log", "wb") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True)
                code = self.proc.wait()
            self.times[name] = round(time.perf_counter() - started, 1)
            if code != 0:
                self.failed = f"{name} exited {code}:\n{tail(self.logs / f'{name}.log')}"
                return

    def finish(self, timeout: float = 600) -> dict[str, float]:
        self.join(timeout)
        if self.is_alive() or self.failed:
            raise RuntimeError(self.failed or f"the single-node reference did not finish in {timeout:.0f}s")
        return self.times

    def stop(self) -> None:
        """Interrupt the running command's process group (a Ray driver shuts its Ray down, a launch its ranks);
        kill it if it is still there 20 s later."""
        self.stopped = True
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def stage_files(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote, its manifest excepted (it holds the run directory and times)."""
    from hyperofa_dist.formats.files import sha256_file

    return {str(p.relative_to(stage_dir)): sha256_file(p) for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


# --- the generated world ------------------------------------------------------------------------------------


def build_world(root: Path) -> dict[str, Path]:
    """A 6-language corpus, a target tokenizer over it, a tiny source model with its own tokenizer, word vectors."""
    import numpy as np

    from hyperofa_dist import synthetic

    world = synthetic.World(synthetic.default_languages(6), n_concepts=800, seed=0)
    corpus = root / "corpus"
    synthetic.write_corpus(corpus, world, synthetic.skewed_sizes(world.languages, largest=2000, ratio=0.6), seed=0)
    texts = [line for path in sorted(corpus.iterdir()) for line in synthetic.read_lines(path, limit=400)]
    target = synthetic.train_source_tokenizer("xlmr", texts, 600, root / "target_tokenizer")
    source_tok = synthetic.train_source_tokenizer(
        "xlmr", synthetic.read_lines(corpus / f"{world.languages[0].code}.txt"), 400, root / "source_tokenizer")
    source = synthetic.make_tiny_model("xlmr", source_tok, root / "source_model", hidden_size=16, num_layers=1)
    rng = np.random.default_rng(0)
    keys = [f"{lang.code[:3]}:{world.lexicon[lang.code][c]}" for lang in world.languages for c in range(300)]
    vectors = root / "vectors.vec"
    with open(vectors, "w", encoding="utf-8") as f:
        f.write(f"{len(keys)} 8\n")
        for key in keys:
            f.write(key + " " + " ".join(f"{v:.5f}" for v in rng.standard_normal(8)) + "\n")
    return {"corpus": corpus, "target": target, "source": source, "vectors": vectors}


# --- the Ray drill ---------------------------------------------------------------------------------------------

RAY_TASKS_SCRIPT = r"""
import json, sys, time
from ray.util.state import list_nodes, list_tasks
address = sys.argv[1]
nodes = {n.node_id: n.node_ip for n in list_nodes(address=address)}
previous = None
for _ in range(60):  # task events reach the head in batches: read until two reads agree and all finished
    tasks = [{"name": t.name, "node": nodes.get(t.node_id, t.node_id), "job": t.job_id, "state": t.state,
              "attempt": t.attempt_number}
             for t in list_tasks(address=address, limit=10000, raise_on_missing_output=False)]
    if tasks == previous and all(t["state"] == "FINISHED" for t in tasks):
        break
    previous = tasks
    time.sleep(1.0)
print(json.dumps({"nodes": sorted(nodes.values()), "tasks": tasks}))
"""

STAGE_TASKS = {"prepare": ("count_sentences", "prepare_chunks"), "mapping": ("_postings_task",)}


def ray_overrides(world: dict[str, Path], run_dir: Path) -> dict[str, list[str]]:
    common = [f"run.dir={run_dir}", f"tokenizer.path={world['target']}", "tracking.enabled=false"]
    return {
        "prepare": [*common, f"corpus.path={world['corpus']}", "prepare.block_size=32", "prepare.blocks_per_sample=4",
                    "prepare.samples_per_shard=8", "prepare.chunk_bytes=8192", "prepare.heldout_fraction=0.05"],
        "mapping": [*common, f"source.model={world['source']}", f"vectors.path={world['vectors']}",
                    "mapping.num_primitives=8", "mapping.words_per_task=200"],
    }


def ray_drill(work: Path) -> dict[str, Any]:
    clock = Clock()
    env = base_env(work)
    report: dict[str, Any] = {"drill": "ray", "checks": {}}
    with clock("world"):
        world = build_world(work / "world")

    # Single node: the stages as a user runs them on one machine (a local Ray with 2 CPUs), beside the cluster.
    single = work / "single"
    reference = Reference([(f"single_{stage}", hyperofa(stage, *overrides, "ray.num_cpus=2"))
                          for stage, overrides in ray_overrides(world, single).items()], work / "logs", env)
    reference.start()
    token = work / "ray_token"
    token.write_text(os.urandom(32).hex())
    # Ray 2.60 authenticates a cluster whose head has a token (docs/DISTRIBUTED.md §8.2): every node and driver
    # must hold the same one, whether or not this machine's ~/.ray/auth_token exists.
    cluster_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    temp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir="/tmp"))  # Unix socket paths must be short
    try:
        with two_nodes(work) as cluster, ProcessWatch(cluster) as watch:
            a, b = cluster.nodes
            head = f"{a.addr}:{RAY_PORT}"
            ray_cli = str(Path(sys.executable).parent / "ray")  # the `ray` of this Python's environment
            common = ["--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
            with clock("cluster_start"):
                code = cluster.run(a, [ray_cli, "start", "--head", "--node-ip-address", a.addr, "--port", str(RAY_PORT),
                                       "--dashboard-host", a.addr, "--dashboard-port", str(DASHBOARD_PORT),
                                       "--temp-dir", str(temp), "--num-cpus", "0", *common], "ray_head", cluster_env,
                                   timeout=120)
                if code != 0:
                    raise RuntimeError(f"ray start --head exited {code}:\n{tail(work / 'logs' / 'ray_head.log')}")
                code = cluster.run(b, [ray_cli, "start", "--address", head, "--node-ip-address", b.addr,
                                       "--num-cpus", "2", *common],
                                   "ray_worker", cluster_env, timeout=120)
                if code != 0:
                    raise RuntimeError(f"ray start --address exited {code}:\n{tail(work / 'logs' / 'ray_worker.log')}")
            before = cluster.link_bytes(b)
            multi = work / "two_nodes"
            for stage, overrides in ray_overrides(world, multi).items():
                with clock(f"two_nodes_{stage}"):
                    code = cluster.run(a, hyperofa(stage, *overrides, f"ray.address={head}"), f"two_nodes_{stage}",
                                       cluster_env)
                if code != 0:
                    raise RuntimeError(f"two-node {stage} exited {code}:\n{tail(work / 'logs' / f'two_nodes_{stage}.log')}")
            after = cluster.link_bytes(b)
            with clock("task_query"):
                out = subprocess.run(["ip", "netns", "exec", a.ns, sys.executable, "-c", RAY_TASKS_SCRIPT, head],
                                     capture_output=True, text=True, env=cluster_env, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"Ray state query failed:\n{out.stderr[-2000:]}")
            state = json.loads(out.stdout.strip().splitlines()[-1])
            processes = watch.summary({"raylet": r"/raylet/raylet ", "gcs_server": r"gcs_server ",
                                       "ray_worker_task": r"^ray::(prepare_chunks|count_sentences|_postings_task)",
                                       "hyperofa_driver": r"hyperofa_dist\.cli (prepare|mapping)"})
    except BaseException:
        reference.stop()
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    clock.times.update(reference.finish())

    report["cluster_nodes"] = state["nodes"]
    report["veth_bytes_node_b"] = {k: after[k] - before[k] for k in after}
    per_stage: dict[str, dict[str, Any]] = {}
    for stage, names in STAGE_TASKS.items():
        rows = [t for t in state["tasks"] if t["name"] in names]
        per_stage[stage] = {
            "tasks": len(rows),
            "by_node": {ip: sum(1 for t in rows if t["node"] == ip) for ip in ADDRS},
            "by_name_and_node": dict(sorted(Counter(f"{t['name']}@{t['node']}" for t in rows).items())),
            "not_finished": sum(1 for t in rows if t["state"] != "FINISHED"),
        }
    report["tasks"] = per_stage
    report["processes_seen"] = processes

    identical = {}
    for stage in STAGE_TASKS:
        one, two = single / stage, multi / stage
        m1 = json.loads((one / MANIFEST).read_text())
        m2 = json.loads((two / MANIFEST).read_text())
        files1, files2 = stage_files(one), stage_files(two)
        identical[stage] = {
            "files": len(files1),
            "bytes": sum((one / p).stat().st_size for p in files1),
            "files_identical": files1 == files2,
            "manifest_outputs_identical": m1["outputs"] == m2["outputs"],
            "inputs_digest_identical": m1.get("inputs_digest") == m2.get("inputs_digest"),
        }
    report["outputs"] = identical
    checks = report["checks"]
    checks["two_nodes_in_cluster"] = sorted(state["nodes"]) == sorted(ADDRS)
    for stage in STAGE_TASKS:
        head_addr, worker_addr = ADDRS  # A has no CPU: every task ran on B, for the driver on A
        checks[f"{stage}_tasks_on_worker_node"] = per_stage[stage]["by_node"] == {
            head_addr: 0, worker_addr: per_stage[stage]["tasks"]}
        checks[f"{stage}_all_tasks_finished"] = per_stage[stage]["tasks"] > 0 and per_stage[stage]["not_finished"] == 0
        checks[f"{stage}_outputs_byte_identical"] = all(
            v for k, v in identical[stage].items() if k.endswith("_identical")) and identical[stage]["files"] > 0
    report["wall_s"] = {**clock.times, "total": clock.total()}
    return report


# --- the DeepSpeed drill --------------------------------------------------------------------------------------

BLOCK = 32
PRETRAIN_YAML = """\
# The drill's pretraining config: a tiny model, 8 steps, a checkpoint every 4 (the kill lands after step 4).
tracking:
  enabled: false
pretrain:
  model: {model}
  shards: {shards}
  zero: zero2
  steps: 8
  save_every: 4
  eval_every: 4
  micro_batch_size: 4
  grad_accum: 2
  lr: 0.005
  warmup_steps: 0
  num_workers: 0
  prefetch_factor: 2
  shuffle_buffer: 16
  eval_blocks: 8
  log_every: 1
"""
KILL_AFTER = "step00000004"


def build_pretrain_world(root: Path) -> dict[str, Path]:
    """A tokenizer over a 4-language corpus, a tiny XLM-R masked LM, and prepare-format shards of its tokens."""
    import numpy as np

    from hyperofa_dist import synthetic
    from hyperofa_dist.formats.rundir import Stage
    from hyperofa_dist.formats.shards import build_shards, write_shard
    from hyperofa_dist.formats.tokenizer import load_tokenizer, tokenizer_fingerprint

    world = synthetic.World(synthetic.default_languages(4), n_concepts=800, seed=0)
    corpus = root / "corpus"
    synthetic.write_corpus(corpus, world, {lang.code: 600 for lang in world.languages}, seed=0)
    texts = [line for path in sorted(corpus.iterdir()) for line in synthetic.read_lines(path, limit=400)]
    tok = synthetic.train_source_tokenizer("xlmr", texts, 500, root / "tokenizer")
    model = synthetic.make_tiny_model("xlmr", tok, root / "model", max_position=BLOCK + 8)
    tokenizer = load_tokenizer(tok)
    prepare = root / "prepare"
    listed = []
    for path in sorted(corpus.iterdir()):
        lang = path.name.split(".")[0]
        ids = [i for line in synthetic.read_lines(path) for i in tokenizer(line)["input_ids"]]
        n = len(ids) // BLOCK
        blocks = np.asarray(ids[: n * BLOCK], dtype=np.uint32).reshape(n, BLOCK)
        cut = max(1, n // 10)
        for split, part in (("heldout", blocks[:cut]), ("train", blocks[cut:])):
            for shard in build_shards(part, lang, 0, 4, 4):
                write_shard(prepare / split / shard.name, shard.data, keep_existing=False)
                listed.append({"path": f"{split}/{shard.name}", "split": split, "lang": lang, "blocks": shard.blocks})
    stage = Stage(root, "prepare")
    stage.begin("drill")
    stage.write_manifest(config={}, inputs={"tokenizer": tokenizer_fingerprint(tok)}, outputs=[],
                         extra={"shards": listed, "block_size": BLOCK})
    config = root / "pretrain.yaml"
    config.write_text(PRETRAIN_YAML.format(model=model, shards=prepare))
    return {"config": config, "model": model, "prepare": prepare}


def train_losses(stage_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    path = stage_dir / TRAIN_LOG
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        out[int(row["step"])] = float(row["loss"])
    return out


def deepspeed_drill(work: Path) -> dict[str, Any]:
    clock = Clock()
    env = base_env(work)
    report: dict[str, Any] = {"drill": "deepspeed", "checks": {}}
    with clock("world"):
        world = build_pretrain_world(work / "world")
    config = str(world["config"])

    # Single node, uninterrupted: two local ranks, as `hyperofa pretrain` runs on one machine; beside the drill.
    single = work / "single"
    reference = Reference([("single_node", hyperofa("pretrain", "--config", config, f"run.dir={single}",
                                                   "pretrain.ranks_per_node=2"))], work / "logs", env)
    reference.start()

    hostfile = work / "hostfile"
    hostfile.write_text("".join(f"{name} slots=1\n" for name in HOSTNAMES))
    multi = work / "two_nodes"
    stage_dir = multi / "pretrain" / "hyperofa"
    try:
        two = two_node_pretrain(work, env, config, hostfile, multi, stage_dir, clock)
    except BaseException:
        reference.stop()
        raise
    clock.times.update(reference.finish())
    expected = train_losses(single / "pretrain" / "hyperofa")
    report.update(two)
    got = train_losses(stage_dir)
    ranks = [json.loads((stage_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)
             if (stage_dir / "ranks" / f"rank{r}.json").is_file()]
    diffs = {step: abs(got[step] - expected[step]) for step in expected if step in got}
    report.update({
        "losses_single_node": expected,
        "losses_two_nodes_resumed": got,
        "max_abs_loss_diff": max(diffs.values()) if diffs else None,
        "rank_summaries": ranks,
    })
    processes, after_kill = two["processes_seen"], two["after_kill"]
    checks = report["checks"]
    checks["killed_after_checkpoint_before_the_end"] = (
        after_kill["latest"] == KILL_AFTER and not after_kill["manifest"] and max(after_kill["steps_logged"], default=0) < 8)
    checks["node_a_failed_with_one_error_line"] = two["node_a_exit_after_kill"] == 2 and two["node_a_error"] is not None
    checks["nothing_left_on_node_a"] = not two["left_on_node_a_after_kill"]
    checks["resume_succeeded_on_both_nodes"] = two["resume_exit_codes"] == [0, 0] and (stage_dir / MANIFEST).is_file()
    checks["same_steps_as_single_node"] = sorted(got) == sorted(expected) == list(range(1, 9))
    checks["losses_within_tolerance"] = bool(diffs) and max(diffs.values()) <= LOSS_TOLERANCE
    checks["one_rank_on_each_node"] = processes["A"]["ranks"] == [0] and processes["B"]["ranks"] == [1]
    checks["world_size_2_on_resume"] = sorted((r["rank"], r["world_size"], r["steps"]) for r in ranks) == [
        (0, 2, 8), (1, 2, 8)]
    report["wall_s"] = {**clock.times, "total": clock.total()}
    return report


def wait_both(cluster: TwoNodes, driver: subprocess.Popen, follower: subprocess.Popen, logs: Path,
              timeout: float = 300) -> list[int]:
    """Exit codes of both nodes' commands. One node failing alone leaves the other waiting in the rendezvous
    (torch's 30-minute default): then both nodes are stopped and the drill fails with both logs' ends."""
    deadline = time.monotonic() + timeout
    while driver.poll() is None or follower.poll() is None:
        failed = [p for p in (driver, follower) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            time.sleep(0 if time.monotonic() > deadline else 10)  # the other node's own end, if it comes
            for node in cluster.nodes:
                kill_namespace(node.ns)
            what = f"exit codes {driver.poll()}, {follower.poll()}" if failed else f"not done in {timeout:.0f}s"
            raise RuntimeError(f"two-node resume: {what}\nnode A:\n{tail(Path(f'{logs}A.log'))}\n"
                               f"node B:\n{tail(Path(f'{logs}B.log'))}")
        time.sleep(0.2)
    return [driver.returncode, follower.returncode]


def two_node_pretrain(work: Path, env: dict[str, str], config: str, hostfile: Path, multi: Path, stage_dir: Path,
                      clock: Clock) -> dict[str, Any]:
    """Both nodes until the step-4 checkpoint, node B killed, node A's end, both nodes resumed to the end."""
    script = str(HERE / "nossh_node.sh")
    with two_nodes(work) as cluster, ProcessWatch(cluster) as watch:
        a, b = cluster.nodes

        def start(node: Node, name: str, *extra: str) -> subprocess.Popen:
            # Each node's gloo binds its own interface, as NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME do on a cluster.
            node_env = {**env, "GLOO_SOCKET_IFNAME": node.veth}
            return cluster.popen(node, ["bash", script, "pretrain", str(node.index), config, str(hostfile), f"run.dir={multi}",
                                        *extra], f"{name}_node{node.label}", node_env)

        before = cluster.link_bytes(b)
        with clock("two_nodes_until_kill"):
            driver, follower = start(a, "first"), start(b, "first")
            deadline = time.monotonic() + 300
            while latest_tag(stage_dir / "checkpoints") != KILL_AFTER:  # the checkpoint is whole on every rank
                if driver.poll() is not None or follower.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the two-node run ended or stalled before {KILL_AFTER}:\n"
                                       f"{tail(work / 'logs' / 'first_nodeA.log')}\n{tail(work / 'logs' / 'first_nodeB.log')}")
                time.sleep(0.05)
        killed = kill_namespace(b.ns)
        with clock("node_a_notices"):
            try:
                driver_code = driver.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise RuntimeError("node A kept running for 120 s after node B was killed") from None
        follower.wait()
        left_on_a = [{"pid": p, "cmd": _cmdline(p)[:200]} for p in namespace_pids(a.ns)]
        first_log = (work / "logs" / "first_nodeA.log").read_text(errors="replace")
        error_lines = [line for line in first_log.splitlines() if line.startswith("hyperofa pretrain: error:")]
        after_kill = {"latest": (stage_dir / "checkpoints" / "latest").read_text().strip(),
                      "manifest": (stage_dir / MANIFEST).exists(),
                      "steps_logged": sorted(train_losses(stage_dir))}
        with clock("two_nodes_resume"):
            driver, follower = start(a, "resume", "pretrain.resume=true"), start(b, "resume", "pretrain.resume=true")
            resume_codes = wait_both(cluster, driver, follower, work / "logs" / "resume_node")
        after = cluster.link_bytes(b)
        processes = watch.summary({"hyperofa_driver": r"hyperofa(_dist\.cli)? pretrain ",
                                   "node_script": r"python - pretrain \d",
                                   "deepspeed_runner": r"deepspeed\.launcher\.runner",
                                   "deepspeed_node_launcher": r"deepspeed\.launcher\.launch ",
                                   "rank": r"-m hyperofa_dist\.pretrain\.train"})
    return {
        "killed_on_node_b": killed,
        "node_a_exit_after_kill": driver_code,
        "node_a_error": error_lines[-1] if len(error_lines) == 1 else None,
        "left_on_node_a_after_kill": left_on_a,
        "after_kill": after_kill,
        "resume_exit_codes": resume_codes,
        "veth_bytes_node_b": {k: after[k] - before[k] for k in after},
        "processes_seen": processes,
    }


# --- entry point ------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drill", choices=["ray", "deepspeed"])
    parser.add_argument("--work", help="directory for the drill's files (default: a temporary one, removed after)")
    parser.add_argument("--report", help="also write the JSON report here")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every clean-up (namespaces, Ray, the reference run)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="hyperofa-drill-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        check_namespaces()
        report = (ray_drill if args.drill == "ray" else deepspeed_drill)(work)
        report["passed"] = all(report["checks"].values())
        code = 0 if report["passed"] else 1
    except DrillError as exc:
        report, code = {"drill": args.drill, "passed": False, "cannot_run": str(exc)}, 2
    except Exception as exc:  # noqa: BLE001 - a broken drill is a failed drill, reported like the others
        report, code = {"drill": args.drill, "passed": False, "error": f"{type(exc).__name__}: {exc}"}, 1
    report["work"] = str(work)
    report.setdefault("wall_s", {})["drill_total"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print(text)
    if not args.work and code == 0:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
