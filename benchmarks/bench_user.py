"""The user's path: ``AWSEC2.submit_script``/``check_output`` and the ``crimpl`` command
against ssh, tar|ssh, rsync and cat|ssh, side by side in one run.

Usage::

    python3 benchmarks/bench_user.py --latency-ms 20 --out docs/benchmarks.md
    python3 benchmarks/bench_user.py --quick        # 20 files, 4 MiB, one repeat: does it run?

The server is the local sandbox (tests/sandbox.py): moto_server is EC2, and
``crimpl up --provisioner boto3`` launches the instance there; a real OpenSSH
sshd serves it with the host key from its user data, as cloud-init would. An
OpenSSH config file (``CRIMPL_SSH_CONFIG``) routes the instance's addresses to
``benchmarks/latency_proxy.py`` (``--latency-ms`` each way), in front of that
sshd. The peer tools use the same config file, so the same proxy and sshd, with
``ControlMaster no``: a new SSH connection per command, as crimpl opens one per call.

Each case runs three ways: the Python API in this process (the server object
made once, as a script holds it), the ``crimpl`` console script as a
subprocess in a project folder with the sandbox's environment (``cwd`` has
``Pulumi.bench.yaml``, ``CRIMPL_STACK``, ``AWS_ENDPOINT_URL``, ``CRIMPL_HOME``,
``CRIMPL_SSH_CONFIG``), and the peer command. They alternate within each repeat,
after ``sync``; the table shows medians. Round trips are counted on the server
side for every tool: SSH connections and exec channels from sshd's log
(``LogLevel VERBOSE``), EC2 API calls from moto_server's request log; crimpl's
own ``report.channels``/``report.connections`` are shown where its reports have them.

Everything lives in a ``/tmp/crimpl-bench-user-*`` folder, removed at the end;
only 127.0.0.1 is used; sshd, moto_server and the proxy are stopped by pid at
the end, on Ctrl-C and on SIGTERM, and end with this process even if it is killed.
"""

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

import latency_proxy  # noqa: E402
from bench_transfer import machine  # noqa: E402
from sandbox import (Sandbox, Sshd, die_with_parent, interrupt_on_signals, moto_client,  # noqa: E402
                     user_data_host_key, wait_until)

FILE_SIZE = 8 * 1024
STACK = "bench"
#: The name the peers' known_hosts files the instance's key under (whichever port the route uses).
HOST_ALIAS = "crimpl-bench-instance"
SECTION_START = "<!-- bench_user:start (written by benchmarks/bench_user.py; replaced by its next run) -->"
SECTION_END = "<!-- bench_user:end -->"
PATHS = ("API", "CLI")
#: Counted in the servers' logs between the start and the end of one timed command.
ROUND_TRIPS = {"connections": ("sshd", "Accepted publickey"), "channels": ("sshd", "Starting session:"),
               "ec2": ("moto", '"POST / ')}


@dataclass
class Sizes:
    """How much data each case moves."""

    files: int = 2000
    big: int = 300 * 2**20
    changed: int = 10


@dataclass
class Case:
    """One scenario: what is compared, with which peer, against which target.

    :param kind: ``ratio`` (crimpl time / peer time at most ``limit``), ``seconds``
        (crimpl time under ``limit``) or ``throughput`` (peer time / crimpl time at least ``limit``).
    """

    key: str
    label: str
    peer: str
    kind: str
    limit: float
    latency: str = "link"
    results: dict = field(default_factory=dict)

    @property
    def target(self):
        """The target in words; a ratio is to the peer's time (a throughput: the peer's rate)."""
        if self.kind == "ratio":
            return f"≤ {self.limit:g}x"
        if self.kind == "seconds":
            return f"under {self.limit:g} s"
        return f"≥ {self.limit:g}x throughput"

    def verdict(self, crimpl, peer):
        """Return ``(value shown, met)`` for medians ``crimpl`` and ``peer`` (seconds)."""
        if self.kind == "ratio":
            return crimpl / peer, crimpl / peer <= self.limit
        if self.kind == "seconds":
            return crimpl / peer, crimpl < self.limit
        return peer / crimpl, peer / crimpl >= self.limit


class Tool:
    """One way to do a case: ``prepare(i)`` (not timed) returns what ``run`` gets, ``run`` is timed,
    ``check(result)`` (not timed) makes sure it did what the case says."""

    def __init__(self, run, prepare=None, check=None):
        self.run, self.prepare, self.check = run, prepare, check


class VerboseSshd(Sshd):
    """The sandbox's sshd, logging every exec channel (``Starting session:``) so they can be counted."""

    def _login_lines(self):
        return super()._login_lines() + "LogLevel VERBOSE\n"


def run(command, *, cwd=None, env=None, stdin=None):
    """Run an argv list, or a shell command given as a string; return its stdout.

    It runs in its own process group, killed if this process is interrupted meanwhile.

    :raises RuntimeError: with the end of its stderr if it fails.
    """
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        process = subprocess.Popen(command, shell=isinstance(command, str), cwd=cwd, env=env, stdin=source,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode}): {err.decode(errors='replace')[-800:]}")
    return out.decode(errors="replace")


def make_tree(root, count):
    """``count`` files of 8 KiB of random bytes, 100 per folder; return ``root``."""
    for i in range(count):
        path = root / f"d{i // 100:02d}" / f"f{i % 100:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(FILE_SIZE))
    return root


def make_big(path, size):
    """A file of ``size`` random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for start in range(0, size, 2**20):
            handle.write(os.urandom(min(2**20, size - start)))
    return path


def rewrite(paths):
    """Give each file new random content and a later mtime (rsync compares mtimes in whole seconds)."""
    for path in paths:
        old = path.stat().st_mtime_ns
        path.write_bytes(os.urandom(path.stat().st_size))
        later = max(time.time_ns(), old + 2 * 10**9)
        os.utime(path, ns=(later, later))


class Bench:
    """The sandbox, the instance, the route, and the three ways to reach it."""

    def __init__(self, latency_ms, sizes):
        self.latency_ms = latency_ms
        self.sizes = sizes
        self.work = Path(tempfile.mkdtemp(prefix="crimpl-bench-user-", dir="/tmp"))
        self.local = self.work / "local"
        self.box = self.proxy = self.sshd = None
        self.changes = 0

    # -- set-up --------------------------------------------------------------------

    def start(self):
        self.box = Sandbox(self.work / "sandbox", die_with_parent=True).start()
        self.project = self.work / "project"
        self.project.mkdir()
        (self.project / f"Pulumi.{STACK}.yaml").write_text(self.box.stack_yaml(), encoding="utf-8")
        self.ssh_config = self.work / "ssh_config"
        self.known_hosts = self.work / "known_hosts"
        self.known_hosts.write_text("")
        self.env = {**os.environ, **self.box.env,
                    "CRIMPL_HOME": str(self.work / "crimpl-home"), "CRIMPL_STACK": STACK,
                    "CRIMPL_PROVISIONER": "boto3", "CRIMPL_SSH_CONFIG": str(self.ssh_config),
                    # This checkout's crimpl, whatever the installed console script's package points at.
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    # Never the developer's real AWS files.
                    "AWS_CONFIG_FILE": str(self.work / "no-aws-config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(self.work / "no-aws-credentials")}
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_EC2"):
            self.env.pop(name, None)
            os.environ.pop(name, None)
        os.environ.update(self.env)  # the API in this process sees what the command sees
        self.crimpl = [str(console_script())]
        self.cli("up")
        self._serve_instance()
        self.proxy, self.proxy_port = latency_proxy.spawn(self.sshd.port, self.latency_ms, lifetime=3600,
                                                          preexec_fn=die_with_parent)
        self.route(self.proxy_port)
        self.jobs = self.sshd.home / "crimpl" / "jobs"
        self.store = self.sshd.home / "crimpl" / "objects"
        self.counters = {"sshd": self.sshd.workdir / "sshd.log", "moto": self.box.dir / "moto_server.log"}
        import crimpl

        self.server = crimpl.AWSEC2(self.instance_id, config=crimpl.AWSEC2_Config(
            KeyFile=str(self.box.key), username=self.box.user, ssh_timeout=60))
        self.one = self.project / "one.sh"
        self.one.write_text("true\n")
        # crimpl replaces the host key from the user data over its first two connections:
        # done before anything is timed, and the peers then pin the key the server ends with.
        for _ in range(3):
            self.idle()
            self.server.submit_script(str(self.one), quiet=True)
            if self.server.tags.get("crimpl:host-key-rotated") == "true":
                break
        else:
            raise RuntimeError("crimpl did not replace the instance's host key in three connections")
        kind, blob = run(["ssh-keygen", "-y", "-f", str(self.sshd.host_key)]).split()[:2]
        self.known_hosts.write_text(f"{HOST_ALIAS} {kind} {blob}\n")
        run(f"{self.ssh} {self.host} true")
        return self

    def _serve_instance(self):
        """Start the instance's sshd with the host key from its user data, as cloud-init would."""
        ec2 = moto_client(self.box.moto.url)
        instance = ec2.describe_instances(
            Filters=[{"Name": "tag:crimpl:managed", "Values": ["true"]}])["Reservations"][0]["Instances"][0]
        self.instance_id = instance["InstanceId"]
        self.addresses = [a for a in (instance.get("PublicIpAddress"), instance.get("PrivateIpAddress")) if a]
        self.host = self.addresses[0]
        private, _public = user_data_host_key(ec2, self.instance_id)
        workdir = self.box.dir / f"sshd-{self.instance_id}"
        self.sshd = VerboseSshd(workdir, private, self.box.key.with_suffix(".pub").read_text(),
                                home=workdir / "home", die_with_parent=True)
        self.box.sshds[self.instance_id] = self.sshd  # box.stop() stops it
        self.sshd.start()

    def route(self, port):
        """Route the instance's addresses to ``127.0.0.1:port``, for crimpl and the peers alike."""
        self.ssh_config.write_text(
            f"Host {' '.join(self.addresses)}\n"
            f"  HostName 127.0.0.1\n  Port {port}\n  User {self.box.user}\n"
            f"  IdentityFile {self.box.key}\n  IdentitiesOnly yes\n"
            f"  HostKeyAlias {HOST_ALIAS}\n  UserKnownHostsFile {self.known_hosts}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
            # A fresh connection per command, as crimpl opens one per call.
            "  ControlMaster no\n  ControlPath none\n  LogLevel ERROR\n"
            # Nothing may leave the machine: every other name goes to a closed loopback port.
            f"Host *\n  HostName 127.0.0.1\n  Port {self.box.routes.closed_port}\n",
            encoding="utf-8")

    @property
    def ssh(self):
        return f"ssh -F {shlex.quote(str(self.ssh_config))}"

    def pids(self):
        return {"sshd": self.sshd.process.pid, "moto_server": self.box.moto.process.pid,
                "proxy": self.proxy.pid}

    def close(self):
        """Stop the proxy, sshd and moto_server by pid, and remove the work folder. Safe to repeat."""
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        if self.box is not None:
            self.box.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- the three ways in ---------------------------------------------------------------

    def cli(self, *args):
        return run([*self.crimpl, *args], cwd=self.project, env=self.env)

    def api_submit(self, files=None):
        return self.server.submit_script(str(self.one), files=[str(f) for f in files or []], quiet=True)

    def cli_submit(self, files=None):
        out = self.cli("submit", self.one.name, *[a for f in files or [] for a in ("-f", str(f))], "--quiet")
        found = re.search(r"submitted (\S+?):", out)
        if not found:
            raise RuntimeError(f"crimpl submit printed no job name: {out!r}")
        return found.group(1)

    def idle(self, timeout=60):
        """Wait until no job on the server is running (a submit refuses to start beside one)."""
        def no_job_runs():
            for record in self.jobs.glob("*/crimpl-status"):
                try:
                    if json.loads(record.read_text() or "{}").get("state") == "running":
                        return False
                except (OSError, ValueError):
                    return False  # being written
            return True

        if self.jobs.is_dir():
            wait_until(no_job_runs, timeout, interval=0.02, what="the end of the last job")

    def forget(self, job_name):
        """Remove a job and the stored inputs only it used, on the server's disk (not timed)."""
        shutil.rmtree(self.jobs / job_name, ignore_errors=True)
        for entry in self.store.iterdir():
            if entry.is_file() and entry.stat().st_nlink == 1:
                entry.unlink()

    def job_files(self, job_name, folder):
        return sum(len(files) for _, _, files in os.walk(self.jobs / job_name / folder))

    def change(self, tree):
        """Rewrite the next ``changed`` files of ``tree``; return the tree."""
        files = sorted(tree.rglob("*.bin"))
        start = (self.changes * self.sizes.changed) % len(files)
        rewrite((files * 2)[start:start + self.sizes.changed])
        self.changes += 1
        return tree

    # -- measuring -----------------------------------------------------------------------

    def mark(self):
        return {name: path.stat().st_size for name, path in self.counters.items()}

    def round_trips(self, mark):
        texts = {}
        for name, path in self.counters.items():
            with open(path, "rb") as handle:
                handle.seek(mark[name])
                texts[name] = handle.read().decode(errors="replace")
        return {key: texts[log].count(pattern) for key, (log, pattern) in ROUND_TRIPS.items()}

    def measure(self, case, tools, repeats):
        """Run every tool ``repeats`` times, alternating; keep each run's time and round trips."""
        case.results = {name: [] for name in tools}
        for i in range(repeats):
            for name, tool in tools.items():
                arg = tool.prepare(i) if tool.prepare else None
                os.sync()  # no tool pays for the previous one's dirty pages
                mark = self.mark()
                start = time.perf_counter()
                result = tool.run(arg)
                seconds = time.perf_counter() - start
                sample = {"seconds": seconds, **self.round_trips(mark), **reported(result)}
                if tool.check:
                    tool.check(result)
                case.results[name].append(sample)
                print(f"    {case.key:10s} {name:4s} run {i + 1}: {seconds:6.3f} s  {trips(sample)}", flush=True)


def reported(result):
    """crimpl's own count of its round trips, where its reports have one (``channels``, ``connections``)."""
    found = {}
    if result is None or isinstance(result, str):
        return found  # the command's job name: its reports stay in its process
    for source in (result, getattr(result, "upload_report", None)):
        for name in ("connections", "channels"):
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                found.setdefault(f"reported_{name}", value)
    return found


def trips(sample):
    text = f"{sample['connections']} conn, {sample['channels']} chan"
    if sample.get("ec2"):
        text += f", {sample['ec2']} EC2"
    if "reported_channels" in sample or "reported_connections" in sample:
        text += (f" (crimpl says {sample.get('reported_connections', '?')} conn, "
                 f"{sample.get('reported_channels', '?')} chan)")
    return text


def console_script():
    """The ``crimpl`` command pip installed beside this interpreter (not a pyenv shim), else the one on PATH."""
    beside = Path(sys.executable).with_name("crimpl")
    found = beside if beside.exists() else shutil.which("crimpl")
    if not found:
        raise SystemExit("bench_user: no `crimpl` command: pip install -e . first")
    return found


def expect(**wanted):
    """A check that the API's job (or transfer report) did what the case says."""
    def check(result):
        report = getattr(result, "upload_report", result)
        for name, (low, high) in wanted.items():
            value = len(getattr(report, name)) if name == "files" else getattr(report, name)
            if not low <= value <= high:
                raise AssertionError(f"crimpl's report says {name}={value}, expected {low}..{high}")
    return check


# --------------------------------------------------------------------------- the cases


def build_cases(sizes):
    n, mib = sizes.files, sizes.big / 2**20
    return [
        Case("submit", "submit of a 1-line script, no inputs", "`ssh host 'cat > f && setsid sh f'`",
             "ratio", 1.2),
        Case("first", f"new job, first upload of {n:,} × 8 KiB", "`tar c | ssh tar x`", "ratio", 1.15),
        Case("same", f"new job, same {n:,} files unchanged", "`rsync -a` to a fixed folder", "ratio", 0.5),
        Case("changed", f"new job, {sizes.changed} of {n:,} files changed", "`rsync -a` to a fixed folder",
             "ratio", 0.6),
        Case("big_same", f"new job with the same {mib:g} MiB input", "`rsync -a`, unchanged (reference)",
             "seconds", 0.5),
        Case("fetch", f"fetch of {n:,} outputs", "`ssh tar c | tar x`", "ratio", 1.0),
        Case("raw_up", f"one {mib:g} MiB file up, raw loopback (0 ms)", "`cat | ssh 'cat > f'`",
             "throughput", 0.95, latency="0"),
    ]


def run_cases(b, cases, repeats):
    q = shlex.quote
    n = b.sizes.files
    by_key = {case.key: case for case in cases}

    def submit_tools(files_for, check=None, cli_count=None):
        """API and CLI tools submitting a new job with the inputs ``files_for(path, i)`` gives."""
        def cli_check(name):
            if cli_count is not None and b.job_files(name, "data") != cli_count:
                raise AssertionError(f"job {name} has {b.job_files(name, 'data')} inputs, not {cli_count}")
        return {
            "API": Tool(prepare=lambda i: (b.idle(), files_for("API", i))[1], run=b.api_submit, check=check),
            "CLI": Tool(prepare=lambda i: (b.idle(), files_for("CLI", i))[1], run=b.cli_submit, check=cli_check),
        }

    print("submit of a 1-line script")
    tools = submit_tools(lambda path, i: None, check=expect(files_sent=(0, 3)))
    tools["peer"] = Tool(run=lambda _: run(
        f"{b.ssh} {b.host} {q('cat > peer-job.sh && setsid sh peer-job.sh')}", stdin=b.one))
    b.measure(by_key["submit"], tools, repeats)

    print(f"first upload of {n} files")
    first = b.local / "first"
    tools = submit_tools(lambda path, i: [make_tree(first / f"{path}{i}" / "data", n)],
                         check=expect(files_sent=(n, n + 3)), cli_count=n)
    tools["peer"] = Tool(prepare=lambda i: i, run=lambda i: run(
        f"tar -C {q(str(first / f'API{i}'))} -cf - data | {b.ssh} {b.host} "
        + q(f"mkdir -p peer/first{i} && tar -C peer/first{i} -xf -")))
    b.measure(by_key["first"], tools, repeats)

    print(f"the same {n} files again, then with {b.sizes.changed} changed")
    mine, theirs = b.local / "same" / "crimpl" / "data", b.local / "same" / "rsync" / "data"
    make_tree(mine, n)
    shutil.copytree(mine, theirs)  # same content and mtimes
    rsync = f"rsync -a -e {q(b.ssh)} {q(str(theirs))} {b.host}:peer/fixed/"
    b.idle()
    b.api_submit([mine])  # the store has them: each case below is a new job with inputs sent before
    run(rsync)
    tools = submit_tools(lambda path, i: [mine], check=expect(files_linked=(n, n + 3)), cli_count=n)
    tools["peer"] = Tool(run=lambda _: run(rsync))
    b.measure(by_key["same"], tools, repeats)
    changed = b.sizes.changed
    tools = submit_tools(lambda path, i: [b.change(mine)],
                         check=expect(files_linked=(n - changed, n - changed + 3), files_sent=(changed, changed + 3)),
                         cli_count=n)
    tools["peer"] = Tool(prepare=lambda i: b.change(theirs), run=lambda _: run(rsync))
    b.measure(by_key["changed"], tools, repeats)

    print(f"the same {b.sizes.big / 2**20:g} MiB input again")
    big = make_big(b.local / "big" / "big.bin", b.sizes.big)
    rsync_big = f"rsync -a -e {q(b.ssh)} {q(str(big))} {b.host}:peer/fixed-big/"
    b.idle()
    b.api_submit([big])
    run(rsync_big)
    tools = submit_tools(lambda path, i: [big], check=expect(files_linked=(1, 3), bytes_sent=(0, 2**20)))
    tools["peer"] = Tool(run=lambda _: run(rsync_big))
    b.measure(by_key["big_same"], tools, repeats)

    print(f"fetch of {n} outputs")
    producer = b.project / "outputs.py"
    producer.write_text(
        "import os\n"
        f"for i in range({n}):\n"
        "    folder = f'out/d{i // 100:02d}'\n"
        "    os.makedirs(folder, exist_ok=True)\n"
        f"    with open(f'{{folder}}/f{{i % 100:03d}}.bin', 'wb') as handle:\n"
        f"        handle.write(os.urandom({FILE_SIZE}))\n")
    b.idle()
    job = b.server.submit_script([f"{q(sys.executable)} outputs.py"], files=[str(producer)], quiet=True)
    status = job.wait(timeout=120, interval=0.2)
    if status.state != "complete" or b.job_files(job.job_name, "out") != n:
        raise RuntimeError(f"the job that writes the outputs ended {status}: see {b.jobs / job.job_name}")
    fetched = b.local / "fetched"

    def fresh(way, i):
        shutil.rmtree(fetched, ignore_errors=True)
        return fetched / f"{way}{i}"

    def cli_fetch(dest):
        b.cli("fetch", "out", "--job", job.job_name, "--dest", str(dest), "--quiet")
        return dest

    def fetched_all(dest):
        got = sum(len(files) for _, _, files in os.walk(dest))
        if got != n:
            raise AssertionError(f"{got} files fetched into {dest}, not {n}")

    tools = {
        "API": Tool(prepare=lambda i: fresh("API", i),
                    run=lambda dest: b.server.check_output("out", f"{dest}/", job=job, quiet=True),
                    check=expect(files=(n, n))),
        "CLI": Tool(prepare=lambda i: fresh("CLI", i), run=cli_fetch, check=fetched_all),
        "peer": Tool(prepare=lambda i: fresh("peer", i), run=lambda dest: run(
            f"mkdir -p {q(str(dest))} && {b.ssh} {b.host} {q(f'tar -C crimpl/jobs/{job.job_name} -cf - out')}"
            f" | tar -C {q(str(dest))} -xf -")),
    }
    b.measure(by_key["fetch"], tools, repeats)
    shutil.rmtree(fetched, ignore_errors=True)

    print(f"one {b.sizes.big / 2**20:g} MiB file up, raw loopback (no proxy)")
    b.route(b.sshd.port)
    raw = make_big(b.local / "raw" / "big.bin", b.sizes.big)

    def new_content(*_unused):
        # New bytes at the start: a new object for the store, a new hash for the local index.
        with open(raw, "r+b") as handle:
            handle.write(os.urandom(4096))
        return [raw]

    def sent_then_forget(result):
        expect(bytes_sent=(b.sizes.big, b.sizes.big + 2**20))(result)
        b.forget(result.job_name)

    tools = submit_tools(new_content, check=sent_then_forget)
    tools["CLI"].check = b.forget
    tools["peer"] = Tool(prepare=new_content, run=lambda _: run(
        f"cat {q(str(raw))} | {b.ssh} {b.host} {q('cat > peer/raw.bin')}"))
    b.measure(by_key["raw_up"], tools, repeats)
    b.route(b.proxy_port)


# --------------------------------------------------------------------------- profiles


def import_costs(env, top=8):
    """What ``import crimpl.cli`` costs: wall time over a bare interpreter, and its largest imports.

    :returns: ``{"wall_ms", "bare_ms", "imports": [(name, cumulative ms, nesting level)]}``.
    """
    def wall(code):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run([sys.executable, "-c", code], env=env)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    def table(code):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env,
                              capture_output=True, text=True, check=True)
        rows = []
        for line in done.stderr.splitlines():
            parts = line.split("|")
            if len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            name = parts[2]
            rows.append((name.strip(), int(parts[1]) / 1000, (len(name) - len(name.lstrip()) - 1) // 2))
        return rows

    startup = {name for name, _, _ in table("pass")}
    table("import crimpl.cli")  # warm the file caches
    rows = [row for row in table("import crimpl.cli")
            if row[0] not in startup and "." not in row[0] and row[0] != "crimpl"]
    rows.sort(key=lambda row: -row[1])
    return {"wall_ms": wall("import crimpl.cli"), "bare_ms": wall("pass"), "imports": rows[:top]}


def profiles(b, top=15):
    """cProfile of one API submit and one ``crimpl submit``, no inputs: the top functions by cumulative time."""
    out = {}
    b.idle()
    profile = cProfile.Profile()
    profile.enable()
    b.api_submit()
    profile.disable()
    out["API submit"] = _top(pstats.Stats(profile, stream=io.StringIO()), top)
    b.idle()
    dump = b.work / "cli.prof"
    run([sys.executable, "-m", "cProfile", "-o", str(dump), *b.crimpl, "submit", b.one.name, "--quiet"],
        cwd=b.project, env=b.env)
    out["crimpl submit"] = _top(pstats.Stats(str(dump), stream=io.StringIO()), top)
    return out


def _top(stats, top):
    stats.sort_stats("cumulative")
    stream = io.StringIO()
    stats.stream = stream
    stats.print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line.rstrip() for line in lines[start:] if line.strip()]


# --------------------------------------------------------------------------- report


def summarise(cases):
    """One row per case and crimpl path: medians, ratio, target, met, round trips."""
    rows = []
    for case in cases:
        peer = case.results["peer"]
        peer_s = statistics.median(s["seconds"] for s in peer)
        for path in PATHS:
            samples = case.results[path]
            crimpl_s = statistics.median(s["seconds"] for s in samples)
            value, met = case.verdict(crimpl_s, peer_s)
            rows.append({
                "case": case.key, "label": case.label, "path": path, "peer": case.peer,
                "crimpl_s": crimpl_s, "peer_s": peer_s, "value": value, "kind": case.kind,
                "target": case.target, "met": met, "latency": case.latency,
                "crimpl_trips": _median_trips(samples), "peer_trips": _median_trips(peer),
                "runs": {"crimpl": [s["seconds"] for s in samples], "peer": [s["seconds"] for s in peer]},
            })
    return rows


def _median_trips(samples):
    keys = [k for k in ("connections", "channels", "ec2", "reported_connections", "reported_channels")
            if all(k in s for s in samples)]
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def _trips_text(values):
    text = f"{values['connections']:g} conn, {values['channels']:g} chan"
    if values.get("ec2"):
        text += f", {values['ec2']:g} EC2"
    if "reported_channels" in values:
        text += f" (reported: {values.get('reported_connections', 0):g} conn, {values['reported_channels']:g} chan)"
    return text


def markdown(rows, info):
    """The docs section: the table, how it was measured, and where the CLI's import time goes."""
    lines = [
        "## The user's path: `AWSEC2` and the `crimpl` command (issue 13)",
        "",
        f"Generated by `{info['command']}` on {info['date']}, in {info['elapsed_s']:.0f} s; "
        f"medians of {info['repeats']} repeats, {info['latency_ms']:g} ms added each way "
        "(the last case: none).",
        "",
        f"- Machine: nproc = {info['machine']['nproc']}, {info['machine']['cpu']}, Linux "
        f"{info['machine']['kernel']}; Python {info['machine']['python']}, paramiko "
        f"{info['machine']['paramiko']}, {info['machine']['openssh']}, {info['machine']['rsync']}. "
        f"Load average {info['load_start']:.2f} at the start, {info['load_end']:.2f} at the end"
        + (f"; {info['note']}" if info.get("note") else "") + ".",
        f"- Data: {info['sizes']['files']:,} files of 8 KiB of random bytes in folders of 100; one "
        f"{info['sizes']['big'] / 2**20:g} MiB file of random bytes.",
        "",
        "| case | crimpl via | crimpl | peer | peer time | crimpl / peer | target | met | "
        "round trips, crimpl | round trips, peer |",
        "|---|---|---:|---|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        shown = f"{row['value']:.2f}x" + (" throughput" if row["kind"] == "throughput" else "")
        cells = [row["label"], "`AWSEC2`" if row["path"] == "API" else "`crimpl`", f"{row['crimpl_s']:.3f} s",
                 row["peer"], f"{row['peer_s']:.3f} s", shown, row["target"],
                 "met" if row["met"] else "**missed**", _trips_text(row["crimpl_trips"]),
                 _trips_text(row["peer_trips"])]
        # GitHub ends a table cell at every |, inside code spans too.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    costs = info["imports"]
    biggest = ", ".join(f"`{name}` {ms:.0f} ms" for name, ms, _level in costs["imports"])
    lines += [
        "",
        "How it is measured (`benchmarks/bench_user.py`):",
        "",
        "- One sandbox for every tool: moto_server as EC2, the instance `crimpl up --provisioner boto3` "
        "launched there, served by a real OpenSSH sshd with the host key from its user data. One OpenSSH "
        "config file (`CRIMPL_SSH_CONFIG`) routes the instance's address through "
        "`benchmarks/latency_proxy.py` to that sshd, for crimpl and for the peers alike (`ssh -F`, "
        "`rsync -e 'ssh -F'`); the peers' host key is pinned (`StrictHostKeyChecking yes`).",
        "- Peers use `ControlMaster no`: a new SSH connection per command, as crimpl opens one per call. "
        "Every timing includes connecting.",
        "- `AWSEC2`: the Python API in the benchmark's process (`submit_script(\"one.sh\", files=...)`, "
        "`check_output(\"out\", dest, job=job)`), with the server object made once, as a script holds it. "
        "`crimpl`: the console script as a subprocess in a project folder (`Pulumi.bench.yaml`, "
        "`CRIMPL_STACK`, `AWS_ENDPOINT_URL`, `CRIMPL_HOME`, `CRIMPL_SSH_CONFIG`), `--quiet` as the API's "
        "`quiet=True`: its time includes starting Python and importing crimpl. EC2 calls go to "
        "moto_server on loopback with no added latency; a real EC2 endpoint adds a round trip per call.",
        "- Every submit is a new job (the script is `true`). \"First upload\": new random files for each "
        "run. \"Same\"/\"changed\": the inputs were sent by an earlier job; before each run "
        f"{info['sizes']['changed']} files get new content (rsync has its own copy of the tree, so it sees "
        f"{info['sizes']['changed']} changes too). \"Fetch\": a job wrote the outputs; each run fetches "
        "into a new folder. \"Raw loopback\": the route goes straight to sshd, and each run's file gets "
        "new bytes at its start (a new object for the store, a new hash for the local index).",
        "- Round trips are counted on the server side for every tool: SSH connections and exec channels "
        "in sshd's log (`LogLevel VERBOSE`), EC2 API calls in moto_server's request log; medians. "
        "\"Reported\" is crimpl's own count (`report.connections`/`report.channels`), where its report has it.",
        "- Tools alternate within each repeat, after `sync`. Before each crimpl submit the benchmark waits "
        "(not timed) until the previous job has ended, since a submit refuses to start beside a running job.",
        "",
        f"`import crimpl.cli` takes {costs['wall_ms']:.0f} ms of wall time (a bare `python3 -c pass`: "
        f"{costs['bare_ms']:.0f} ms). The largest packages it imports (`python3 -X importtime`, "
        f"cumulative: a package's time includes the packages it imports): {biggest}.",
    ]
    return "\n".join(lines) + "\n"


def write_section(path, text, start=SECTION_START, end=SECTION_END):
    """Put ``text`` between the markers ``start`` and ``end`` in ``path``: replace the old section, or append."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        new = before + block + (f"\n{after}" if after else "")
    else:
        new = f"{old.rstrip()}\n\n{block}" if old.strip() else block
    path.write_text(new, encoding="utf-8")


def print_table(rows):
    print(f"\n{'case':44s} {'via':4s} {'crimpl':>8s} {'peer':>8s} {'ratio':>7s}  target / met")
    for row in rows:
        verdict = "met" if row["met"] else "MISSED"
        print(f"{row['label']:44s} {row['path']:4s} {row['crimpl_s']:7.3f}s {row['peer_s']:7.3f}s "
              f"{row['value']:6.2f}x  {row['target']}: {verdict}")
        print(f"{'':44s}      crimpl: {_trips_text(row['crimpl_trips'])}; peer: {_trips_text(row['peer_trips'])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency added each way (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per tool and case; medians are shown")
    parser.add_argument("--files", type=int, default=2000, help="files of 8 KiB in the many-file cases")
    parser.add_argument("--big-mib", type=float, default=300, help="size of the large file in MiB")
    parser.add_argument("--quick", action="store_true",
                        help="20 files, 4 MiB, one repeat: checks that it runs, times mean little")
    parser.add_argument("--out", help="write the table into this Markdown file's user-path section")
    parser.add_argument("--json", help="write every run's numbers to this JSON file")
    parser.add_argument("--note", help="a sentence for the docs about the run (e.g. other load)")
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfile's top functions for one API and one CLI submit")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.big_mib, args.repeats = 20, 4, 1
    sizes = Sizes(files=args.files, big=int(args.big_mib * 2**20), changed=min(10, max(1, args.files // 2)))
    command = shlex.join(["python3", "benchmarks/bench_user.py", *(argv if argv is not None else sys.argv[1:])])

    interrupt_on_signals()
    started, load_start = time.monotonic(), os.getloadavg()[0]
    cases = build_cases(sizes)
    bench = Bench(args.latency_ms, sizes)
    try:
        bench.start()
        print(f"sandbox ready in {bench.work}: instance {bench.instance_id}, sshd :{bench.sshd.port}, "
              f"proxy :{bench.proxy_port} (+{args.latency_ms:g} ms each way); "
              f"pids {json.dumps(bench.pids())}", flush=True)
        run_cases(bench, cases, args.repeats)
        extra = {"profiles": profiles(bench)} if args.profile else {}
        costs = import_costs(bench.env)
    except KeyboardInterrupt:
        print("bench_user: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        pids = bench.pids() if bench.sshd is not None and bench.proxy is not None else {}
        bench.close()
    rows = summarise(cases)
    info = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats, "latency_ms": args.latency_ms, "elapsed_s": time.monotonic() - started,
        "machine": {key: " ".join(str(value).split()) for key, value in machine().items()}, "load_start": load_start, "load_end": os.getloadavg()[0], "note": args.note,
        "sizes": vars(sizes), "imports": costs, "pids": pids, **extra,
    }
    print(f"\nmedians of {args.repeats} repeat(s), +{args.latency_ms:g} ms each way; "
          f"took {info['elapsed_s']:.0f} s; load average {load_start:.2f} -> {info['load_end']:.2f}")
    print_table(rows)
    print(f"\nimport crimpl.cli: {costs['wall_ms']:.0f} ms (bare python: {costs['bare_ms']:.0f} ms); largest: "
          + ", ".join(f"{name} {ms:.0f} ms" for name, ms, _ in costs["imports"]))
    for title, lines in extra.get("profiles", {}).items():
        print(f"\ncProfile, {title}:")
        print("\n".join(lines))
    if args.out:
        write_section(args.out, markdown(rows, info))
        print(f"wrote the user-path section of {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
