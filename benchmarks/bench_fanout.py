"""Inputs of a job over N nodes: crimpl's fan-out (client -> rank 0 once, rank 0 -> the others)
against uploading the same inputs from the client to every node, as peers do.

Usage::

    python3 benchmarks/bench_fanout.py --latency-ms 20 --out docs/benchmarks.md
    python3 benchmarks/bench_fanout.py --quick      # 20 small files, 4 MiB, one repeat: does it run?

The cluster is the one the tests build (tests/test_cluster.py): moto_server is
EC2, with a VPC whose subnet hands out loopback private IPs (``127.<k>.1.x``);
``AWSEC2.new(config, nnodes=4)`` launches the nodes there, and each node is a
real OpenSSH sshd with the host key from its user data, its own home, and a
second listening address on its private IP, port 22. The client reaches every
node through its own ``benchmarks/latency_proxy.py`` (``--latency-ms`` each
way), in front of that node's sshd; node-to-node traffic (crimpl's fan-out from
rank 0) goes straight to the private IPs, as on AWS, where the private network
is fast and the user's link is the slow part.

Three ways move the same inputs (one large file and many small ones) into a
new folder on every node: crimpl's ``submit_script`` (its time includes
connecting, checking the nodes, the upload to rank 0, the fan-out and starting
the one-line job on every rank), and ``tar c | ssh <node> tar x`` from the
client to each node, the four at once (as a well-made peer would) and one after
another. The three alternate in each repeat, after ``sync``; every run sends
new content (crimpl's store would otherwise find it on rank 0), and what a run
left on the nodes is removed before the next (not timed). Bytes over the
client's link: crimpl's ``upload_report.bytes_sent``; a peer's are its tar
stream's size times the nodes.

Everything lives in a ``/tmp/crimpl-bench-fanout-*`` folder, removed at the end;
only loopback addresses are used; the proxies, the sshds and moto_server are
stopped by pid at the end, on Ctrl-C and on SIGTERM, and end with this process
even if it is killed.
"""

import argparse
import asyncio
import getpass
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

import latency_proxy  # noqa: E402
from bench_transfer import machine  # noqa: E402
from bench_user import make_big, run, write_section  # noqa: E402
from sandbox import (SSH_CIDRS, MotoServer, Sshd, die_with_parent, interrupt_on_signals,  # noqa: E402
                     make_client_key, moto_client, user_data_host_key)

SECTION_START = "<!-- bench_fanout:start (written by benchmarks/bench_fanout.py; replaced by its next run) -->"
SECTION_END = "<!-- bench_fanout:end -->"
#: The markers of the section a run with ``--link-mbps`` writes (beside the one above).
LINK_SECTION_START = ("<!-- bench_fanout-uplink:start (written by benchmarks/bench_fanout.py --link-mbps; "
                      "replaced by its next run) -->")
LINK_SECTION_END = "<!-- bench_fanout-uplink:end -->"
#: The ways compared, in the table's order: key, label.
WAYS = (("crimpl", "crimpl `submit_script`: client → rank 0 once, rank 0 → the others"),
        ("parallel", "`tar c | ssh <node> tar x` from the client to each node, all at once"),
        ("sequential", "`tar c | ssh <node> tar x` from the client to each node, one after another"),
        ("empty", "crimpl `submit_script` with no inputs (its fixed cost, for reference)"))
#: Second octets tried for the cluster's loopback subnet ``127.<k>.1.0/24``; the tests use 100-249.
SUBNET_OCTETS = range(250, 256)


@dataclass
class Sizes:
    """The inputs: one large file of ``big`` bytes and ``files`` small ones of ``small`` bytes each."""

    big: int
    files: int
    small: int

    @property
    def total(self):
        return self.big + self.files * self.small

    def describe(self):
        return (f"one {self.big / 2**20:g} MiB file and {self.files:,} files of {self.small / 2**10:g} KiB "
                f"(in folders of 100), all random bytes: {round(self.total / 2**20, 1):g} MiB")


def free_subnet_octet(nodes):
    """A ``k`` whose addresses ``127.k.1.4`` onwards have nothing on port 22 (moto hands them out from .4)."""
    for k in SUBNET_OCTETS:
        try:
            for host in range(4, 4 + nodes + 4):
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((f"127.{k}.1.{host}", 22))
        except OSError:
            continue
        return k
    raise RuntimeError(f"port 22 is taken on every 127.k.1.x tried (k in {SUBNET_OCTETS.start}-"
                       f"{SUBNET_OCTETS.stop - 1}): is another bench_fanout running?")


# --------------------------------------------------------------------------- a shared uplink


async def _uplink_pipe(reader, writer, delay, link):
    """Copy ``reader`` to ``writer`` as the client's uplink does: each chunk waits its turn on the
    link (shared by every connection, ``link["rate"]`` bytes/s, first come first served), then ``delay``."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(latency_proxy.QUEUE_CHUNKS)

    async def read_side():
        while data := await reader.read(latency_proxy.CHUNK):
            link["free"] = max(loop.time(), link["free"]) + len(data) / link["rate"]
            await queue.put((link["free"] + delay, data))
        await queue.put((loop.time() + delay, b""))

    async def write_side():
        while True:
            due, data = await queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read_side(), write_side())


async def _serve_uplink(targets, delay_ms, mbps, lifetime):
    """One listening port per target port on 127.0.0.1; client -> target traffic shares one link of
    ``mbps`` Mbit/s; ``delay_ms`` each way. Prints ``LISTENING <port>,<port>,...``."""
    delay, link = delay_ms / 1000.0, {"rate": mbps * 1e6 / 8, "free": 0.0}

    async def handle(client_reader, client_writer, target):
        try:
            server_reader, server_writer = await asyncio.open_connection(latency_proxy.LOOPBACK, target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_uplink_pipe(client_reader, server_writer, delay, link),
                                 latency_proxy._pipe(server_reader, client_writer, delay))
        except (ConnectionError, OSError):
            pass  # one side went away: close both
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    servers = [await asyncio.start_server(lambda r, w, t=target: handle(r, w, t), latency_proxy.LOOPBACK, 0)
               for target in targets]
    print("LISTENING " + ",".join(str(server.sockets[0].getsockname()[1]) for server in servers), flush=True)
    try:
        await asyncio.wait_for(asyncio.gather(*(server.serve_forever() for server in servers)), timeout=lifetime)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass


def spawn_uplink(targets, delay_ms, mbps, lifetime=3600.0, timeout=10.0):
    """Start :func:`_serve_uplink` as a child process (ended with this one); return ``(process, ports)``."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-uplink", ",".join(map(str, targets)),
         "--latency-ms", str(delay_ms), "--link-mbps", str(mbps), "--lifetime", str(lifetime)],
        stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if readable else ""
    if not line.startswith("LISTENING "):
        process.kill()
        process.wait()
        raise RuntimeError(f"the uplink proxy did not start within {timeout} s: {line!r}")
    return process, [int(port) for port in line.split()[1].split(",")]


# --------------------------------------------------------------------------- the cluster


class Bench:
    """moto_server, the N nodes (sshd + proxy each), the peers' SSH config, and the inputs."""

    def __init__(self, nodes, latency_ms, sizes, link_mbps=0.0):
        self.nnodes, self.latency_ms, self.sizes, self.link_mbps = nodes, latency_ms, sizes, link_mbps
        self.work = Path(tempfile.mkdtemp(prefix="crimpl-bench-fanout-", dir="/tmp"))
        self.moto = None
        self.sshds, self.proxies, self.ports, self.homes, self.ips = [], [], [], [], []

    # -- set-up --------------------------------------------------------------------

    def start(self):
        import crimpl

        self.moto = MotoServer(self._dir("moto"), die_with_parent=True)
        self.moto.start()
        os.environ.update({**self.moto.environ(), "CRIMPL_HOME": str(self.work / "crimpl-home"),
                           "CRIMPL_SSH_CONFIG": str(self.work / "crimpl_ssh_config"),
                           # Never the developer's real AWS files.
                           "AWS_CONFIG_FILE": str(self.work / "no-aws-config"),
                           "AWS_SHARED_CREDENTIALS_FILE": str(self.work / "no-aws-credentials")})
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_EC2", "CRIMPL_STACK"):
            os.environ.pop(name, None)
        ec2 = moto_client(self.moto.url)
        k = free_subnet_octet(self.nnodes)
        vpc = ec2.create_vpc(CidrBlock=f"127.{k}.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"127.{k}.1.0/24")["Subnet"]["SubnetId"]
        self.key = make_client_key(self._dir("client"))
        self.user = getpass.getuser()
        config = crimpl.AWSEC2_Config(KeyFile=str(self.key), username=self.user, ssh_cidrs=SSH_CIDRS,
                                      SubnetId=subnet, use_private_ip=True, ssh_timeout=60)
        self.server = crimpl.AWSEC2.new(config, nprocs=2, nnodes=self.nnodes, server_name="fanout")
        public = self.key.with_suffix(".pub").read_text()
        for node in self.server.nodes:
            ip = node.private_ip
            private, _ = user_data_host_key(ec2, node.instanceId)
            home = self.work / f"node-{node.rank}" / "home"
            authorized = home / ".ssh" / "authorized_keys"
            authorized.parent.mkdir(parents=True)
            authorized.write_text(public)
            sshd = Sshd(self.work / f"node-{node.rank}" / "sshd", private, public, home=home,
                        listen=[f"{ip}:22"], die_with_parent=True)
            # The node's own authorized_keys: rank 0 gets in with the key crimpl installs there.
            sshd.authorized_keys = authorized
            self.sshds.append(sshd)
            sshd.start()
            self.homes.append(home)
            self.ips.append(ip)
        if self.link_mbps:
            proxy, self.ports = spawn_uplink([sshd.port for sshd in self.sshds], self.latency_ms, self.link_mbps)
            self.proxies.append(proxy)
        else:
            for sshd in self.sshds:
                proxy, port = latency_proxy.spawn(sshd.port, self.latency_ms, lifetime=3600,
                                                  preexec_fn=die_with_parent)
                self.proxies.append(proxy)
                self.ports.append(port)
        self._write_routes()
        # The first submit makes the node-to-node key and replaces every node's host key from its
        # user data (two connections each): done before anything is timed, and the peers then pin
        # the keys the nodes end with.
        for _ in range(2):
            self._wait(self.server.submit_script(["true"], quiet=True))
        known = self.work / "known_hosts"
        known.write_text("".join(
            f"node{rank} {' '.join(run(['ssh-keygen', '-y', '-f', str(sshd.host_key)]).split()[:2])}\n"
            for rank, sshd in enumerate(self.sshds)))
        self.peer_config = self.work / "peer_ssh_config"
        self.peer_config.write_text("".join(
            f"Host node{rank}\n  HostName 127.0.0.1\n  Port {port}\n  User {self.user}\n"
            f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n  HostKeyAlias node{rank}\n"
            f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
            # A fresh connection per command, as crimpl opens one per call.
            "  ControlMaster no\n  ControlPath none\n  LogLevel ERROR\n"
            for rank, port in enumerate(self.ports)))
        for rank in range(self.nnodes):
            run(f"ssh -F {shlex.quote(str(self.peer_config))} node{rank} true")
        self.local = self._dir("local")
        self.big = make_big(self.local / "big.bin", self.sizes.big)
        self.tree = self.local / "tree"
        self.refresh()
        self.tar_bytes = int(run(f"tar -C {shlex.quote(str(self.local))} -cf - big.bin tree | wc -c"))
        return self

    def _dir(self, name):
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_routes(self):
        """crimpl's OpenSSH config: each node's private IP through that node's proxy."""
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a closed port for every other name
        self._closed = closed
        Path(os.environ["CRIMPL_SSH_CONFIG"]).write_text("".join(
            f"Host {ip}\n  HostName 127.0.0.1\n  Port {port}\n" for ip, port in zip(self.ips, self.ports))
            + f"Host *\n  HostName 127.0.0.1\n  Port {closed.getsockname()[1]}\n")

    def pids(self):
        return {"moto_server": self.moto.process.pid,
                **{f"sshd{rank}": sshd.process.pid for rank, sshd in enumerate(self.sshds)},
                **{f"proxy{i}": proxy.pid for i, proxy in enumerate(self.proxies)}}

    def close(self):
        """Stop what runs in the nodes' homes, the proxies, the sshds and moto_server, by pid;
        remove the work folder. Safe to repeat."""
        for pid in _processes_under(self.work):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proxy in self.proxies:
            if proxy.poll() is None:
                proxy.terminate()
                try:
                    proxy.wait(10)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
        for sshd in self.sshds:
            sshd.stop()
        if self.moto is not None and self.moto.process is not None:
            self.moto.stop()
        if getattr(self, "_closed", None) is not None:
            self._closed.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- the inputs and the nodes' folders (not timed) -----------------------------

    def refresh(self):
        """New content for every input: new bytes at the large file's start, new small files."""
        with open(self.big, "r+b") as handle:
            handle.write(os.urandom(4096))
        for i in range(self.sizes.files):
            path = self.tree / f"d{i // 100:02d}" / f"f{i % 100:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(self.sizes.small))

    def _wait(self, job):
        status = job.wait(timeout=120, interval=0.1)
        if status.state != "complete":
            raise RuntimeError(f"job {job.job_name} ended {status}")
        return job

    def received(self, folder):
        """``(files, bytes)`` under ``folder`` on every node (relative to its home)."""
        found = []
        for home in self.homes:
            files = [Path(d) / f for d, _, names in os.walk(home / folder) for f in names]
            data = [f for f in files if f.suffix == ".bin"]
            found.append((len(data), sum(f.stat().st_size for f in data)))
        return found

    def check_received(self, folder):
        want = (self.sizes.files + 1, self.sizes.total)
        got = self.received(folder)
        if any(g != want for g in got):
            raise AssertionError(f"{folder}: the nodes hold (files, bytes) {got}, expected {want} on each")

    def clear(self):
        """Remove every job's and the peers' folders and the store's objects on every node."""
        for home in self.homes:
            for folder in (home / "crimpl" / "jobs", home / "crimpl" / "objects", home / "peer"):
                shutil.rmtree(folder, ignore_errors=True)

    # -- the three ways --------------------------------------------------------------

    def crimpl(self, name):
        return self.server.submit_script(["true"], files=[self.big, self.tree], job_name=name, quiet=True)

    def empty(self, name):
        return self.server.submit_script(["true"], job_name=name, quiet=True)

    def peer_commands(self, name):
        q = shlex.quote
        receive = q(f"mkdir -p peer/{name} && tar -C peer/{name} -xf -")
        return [f"tar -C {q(str(self.local))} -cf - big.bin tree | ssh -F {q(str(self.peer_config))} "
                f"node{rank} {receive}" for rank in range(self.nnodes)]

    def parallel(self, name):
        processes = [subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
                     for command in self.peer_commands(name)]
        try:
            errors = [(p.args, p.communicate()[1]) for p in processes]
        except BaseException:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            raise
        failed = [(args, err) for (args, err), p in zip(errors, processes) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"{failed[0][0]} failed: {failed[0][1].decode(errors='replace')[-800:]}")

    def sequential(self, name):
        for command in self.peer_commands(name):
            run(command)

    def measure(self, repeats):
        """Run the three ways ``repeats`` times, alternating; return ``{way: [sample, ...]}``."""
        results = {key: [] for key, _ in WAYS}
        for i in range(repeats):
            for key, _ in WAYS:
                if key != "empty":
                    self.refresh()
                name = f"{key}-{i}"
                os.sync()  # no way pays for the previous one's dirty pages
                start = time.perf_counter()
                outcome = getattr(self, key)(name)
                seconds = time.perf_counter() - start
                if key == "empty":
                    self._wait(outcome)
                    sample = {"seconds": seconds, "client_bytes": outcome.upload_report.bytes_sent}
                elif key == "crimpl":
                    self._wait(outcome)
                    report = outcome.upload_report
                    if sorted(report.fanout_bytes) != list(range(1, self.nnodes)):
                        raise AssertionError(f"rank 0 fanned out to {sorted(report.fanout_bytes)}")
                    if report.bytes_sent < self.sizes.total:
                        raise AssertionError(f"crimpl says it sent {report.bytes_sent} bytes, "
                                             f"less than the {self.sizes.total} of the inputs")
                    sample = {"seconds": seconds, "client_bytes": report.bytes_sent,
                              "fanout_bytes": sum(report.fanout_bytes.values())}
                    self.check_received(f"crimpl/jobs/{name}")
                else:
                    sample = {"seconds": seconds, "client_bytes": self.tar_bytes * self.nnodes}
                    self.check_received(f"peer/{name}")
                results[key].append(sample)
                print(f"    {key:10s} run {i + 1}: {seconds:7.3f} s, {_mib(sample['client_bytes']):>10s} "
                      "over the client's link", flush=True)
                self.clear()
        return results


def _processes_under(root):
    """Pids of processes whose working folder is under ``root`` (the nodes' homes: jobs, fan-out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.readlink(entry / "cwd").startswith(str(root)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# --------------------------------------------------------------------------- report


def summarise(results):
    """One row per way: median time and client bytes, and both as a multiple of crimpl's."""
    base_s = statistics.median(s["seconds"] for s in results["crimpl"])
    base_b = statistics.median(s["client_bytes"] for s in results["crimpl"])
    rows = []
    for key, label in WAYS:
        samples = results[key]
        seconds = statistics.median(s["seconds"] for s in samples)
        client = statistics.median(s["client_bytes"] for s in samples)
        rows.append({"way": key, "label": label, "seconds": seconds, "runs": [s["seconds"] for s in samples],
                     "client_bytes": client, "time_ratio": seconds / base_s, "bytes_ratio": client / base_b,
                     "fanout_bytes": statistics.median(s["fanout_bytes"] for s in samples)
                     if "fanout_bytes" in samples[0] else None})
    return rows


def _mib(count):
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def markdown(rows, info):
    """The docs section: the table and how it was measured."""
    m, link = info["machine"], info.get("link_mbps")
    title = f"## Inputs of a job over {info['nodes']} nodes: fan-out from rank 0 against uploading to each node"
    lines = [
        title + (f", through one {link:g} Mbit/s uplink" if link else "") + " (issue 11)",
        "",
        f"Generated by `{info['command']}` on {info['date']}, in {info['elapsed_s']:.0f} s; medians of "
        f"{info['repeats']} repeat{'s' if info['repeats'] != 1 else ''}, {info['latency_ms']:g} ms added each way on the client's link to every "
        "node" + (f", whose connections to every node share one uplink of {link:g} Mbit/s" if link else "")
        + "; node-to-node traffic direct.",
        "",
        f"- Machine: nproc = {m['nproc']}, {m['cpu']}, Linux {m['kernel']}; Python {m['python']}, paramiko "
        f"{m['paramiko']}, {m['openssh']}. Load average {info['load_start']:.2f} at the start, "
        f"{info['load_end']:.2f} at the end" + (f"; {info['note']}" if info.get("note") else "") + ".",
        f"- Inputs: {info['data']}.",
        "",
        "| way | time | runs | over the client's link | time / crimpl | client bytes / crimpl |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        sent = _mib(row["client_bytes"])
        if row["fanout_bytes"] is not None:
            sent += f" (then {_mib(row['fanout_bytes'])} rank 0 → nodes)"
        cells = [row["label"], f"{row['seconds']:.2f} s", ", ".join(f"{s:.2f}" for s in row["runs"]), sent,
                 f"{row['time_ratio']:.2f}x", f"{row['bytes_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if link:
        return "\n".join(lines + [
            "",
            "Measured as in the section above (`benchmarks/bench_fanout.py`), except for the client's link: "
            "one proxy process stands in front of every node's sshd, adds the same delay, and sends what the "
            f"client sends to any node through one queue drained at {link:g} Mbit/s (first come, first "
            "served), as a user's uplink does; what the nodes send back is not capped.",
        ]) + "\n"
    lines += [
        "",
        "How it is measured (`benchmarks/bench_fanout.py`):",
        "",
        f"- The cluster of tests/test_cluster.py: moto_server as EC2, `AWSEC2.new(config, nnodes={info['nodes']})` "
        "launched into a subnet with loopback private IPs (`127.<k>.1.x`); each node is a real OpenSSH sshd "
        "with the host key from its user data, its own home, and its private IP on port 22 for the other "
        "nodes. The client reaches each node through its own `benchmarks/latency_proxy.py`; rank 0's "
        "fan-out (`tar | ssh <node> tar x`, to all nodes at once) goes to the private IPs directly, as on "
        "AWS's private network.",
        "- crimpl: `submit_script([\"true\"], files=[big.bin, tree])` in the benchmark's process. Its time "
        "includes connecting to rank 0, reading there which nodes the node-to-node key is authorized on "
        "(each node was connected to once, by an earlier submit), the upload to rank 0, the fan-out, and "
        "starting the job on every rank; the "
        "peers' time is their upload only. Client bytes: `upload_report.bytes_sent` (the file content crimpl "
        "sent to rank 0; tar headers not counted), with `fanout_bytes` (rank 0's tar streams to the others) "
        "beside it.",
        "- Peers: one `tar c | ssh <node> 'mkdir -p … && tar x'` per node, through the same proxies, "
        "with `ControlMaster no` and pinned host keys; all at once, then one after another. Client bytes: "
        "the tar stream's size (content and headers) times the nodes.",
        "- The proxies add delay but cap no bandwidth: each SSH connection is held to about one window "
        "(2 MiB) per round trip, so four connections at once move up to four times what one moves, as if "
        "the user's uplink had no limit of its own. `--link-mbps` makes the connections share one capped "
        "uplink instead (its own section, below, when it was run).",
        "- Every run sends new content (new bytes at the large file's start, new small files); what it left "
        "on the nodes is removed afterwards (not timed). Ways alternate within each repeat, after `sync`. "
        "Everything runs on this one machine: the nodes' disks, sshds and the proxies share its CPUs, so "
        "four uploads at once compete for them as they would not on four real nodes.",
    ]
    return "\n".join(lines) + "\n"


def print_table(rows):
    print(f"\n{'way':11s} {'time':>9s} {'client link':>12s} {'time/crimpl':>12s} {'bytes/crimpl':>13s}")
    for row in rows:
        print(f"{row['way']:11s} {row['seconds']:8.2f}s {_mib(row['client_bytes']):>12s} "
              f"{row['time_ratio']:11.2f}x {row['bytes_ratio']:12.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency added each way (default 20)")
    parser.add_argument("--nodes", type=int, default=4, help="nodes of the cluster (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way; medians are shown (default 3)")
    parser.add_argument("--big-mib", type=float, default=200, help="size of the large file in MiB (default 200)")
    parser.add_argument("--files", type=int, default=2048, help="small files (default 2048)")
    parser.add_argument("--small-kib", type=float, default=50, help="size of each small file in KiB (default 50)")
    parser.add_argument("--quick", action="store_true",
                        help="4 MiB and 20 files of 8 KiB, one repeat: checks that it runs, times mean little")
    parser.add_argument("--out", help="write the table into this Markdown file's fan-out section")
    parser.add_argument("--json", help="write every run's numbers to this JSON file")
    parser.add_argument("--note", help="a sentence for the docs about the run (e.g. other load)")
    parser.add_argument("--link-mbps", type=float, default=0.0,
                        help="cap the client's uplink at this many Mbit/s, shared by its connections to every "
                             "node (one proxy for all nodes; default 0: one uncapped proxy per node)")
    parser.add_argument("--lifetime", type=float, default=3600.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-uplink", help=argparse.SUPPRESS)  # the child spawn_uplink starts
    args = parser.parse_args(argv)
    if args.serve_uplink:
        targets = [int(port) for port in args.serve_uplink.split(",")]
        asyncio.run(_serve_uplink(targets, args.latency_ms, args.link_mbps, args.lifetime))
        return
    if args.quick:
        args.big_mib, args.files, args.small_kib, args.repeats = 4, 20, 8, 1
    if args.nodes < 2:
        parser.error("--nodes must be 2 or more")
    sizes = Sizes(big=int(args.big_mib * 2**20), files=args.files, small=int(args.small_kib * 2**10))
    command = shlex.join(["python3", "benchmarks/bench_fanout.py", *(argv if argv is not None else sys.argv[1:])])

    interrupt_on_signals()
    started, load_start = time.monotonic(), os.getloadavg()[0]
    bench = Bench(args.nodes, args.latency_ms, sizes, args.link_mbps)
    pids = {}
    try:
        bench.start()
        pids = bench.pids()
        print(f"sandbox ready in {bench.work}: {args.nodes} nodes at {', '.join(bench.ips)}, proxies "
              f"{', '.join(map(str, bench.ports))} (+{args.latency_ms:g} ms each way"
              + (f", one {args.link_mbps:g} Mbit/s uplink" if args.link_mbps else "") + "); "
              f"pids {json.dumps(pids)}", flush=True)
        results = bench.measure(args.repeats)
    except KeyboardInterrupt:
        print("bench_fanout: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        bench.close()
    rows = summarise(results)
    info = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats, "latency_ms": args.latency_ms, "nodes": args.nodes, "link_mbps": args.link_mbps,
        "elapsed_s": time.monotonic() - started,
        "machine": {key: " ".join(str(value).split()) for key, value in machine().items()},
        "load_start": load_start, "load_end": os.getloadavg()[0], "note": args.note,
        "data": sizes.describe(), "pids": pids,
    }
    print(f"\n{info['data']}; {args.nodes} nodes; medians of {args.repeats} repeat(s), +{args.latency_ms:g} ms "
          + (f"each way, one {args.link_mbps:g} Mbit/s uplink" if args.link_mbps else "each way")
          + f"; took {info['elapsed_s']:.0f} s; load average {load_start:.2f} -> {info['load_end']:.2f}")
    print_table(rows)
    if args.out:
        markers = (LINK_SECTION_START, LINK_SECTION_END) if args.link_mbps else (SECTION_START, SECTION_END)
        write_section(args.out, markdown(rows, info), *markers)
        print(f"wrote the fan-out{' (uplink)' if args.link_mbps else ''} section of {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
