"""Transfer benchmark: crimpl against tar|ssh, rsync, scp and cat|ssh over a slow link.

Usage::

    python benchmarks/bench_transfer.py [--delay-ms 20] [--runs 3] [--json out.json]

It starts a loopback sshd (tests/sandbox.py) and a latency proxy in front of it
(benchmarks/latency_proxy.py, ``--delay-ms`` each way), then times each tool
through the proxy: the system ssh with a generated config (host key pinned,
StrictHostKeyChecking yes) and crimpl with a fabric Connection (host key pinned
by PinnedHostKeyPolicy: an unknown or changed key is refused). Every timing
includes opening the SSH connection, since both crimpl and the command-line
tools open one per operation. Medians over
``--runs`` runs; tools alternate within each run so that drift hits them alike.

Scenarios: (1) first upload of 2,000 files of 8 KiB; (2) re-upload with nothing
changed, and with 10 files changed; (3) one 300 MiB file up and down; (4) fetch
2,000 output files of 8 KiB. ``scp -r`` needs several round trips per file, so
on the 2,000-file scenarios it runs once and is stopped after ``--scp-cap``
seconds.

Everything lives in a temporary folder under /tmp, removed at the end.
"""

import argparse
import getpass
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

import latency_proxy  # noqa: E402
from crimpl import hostkeys, ssh, transfer  # noqa: E402
from crimpl.hostkeys import generate_host_key  # noqa: E402
from sandbox import Sshd, make_client_key  # noqa: E402

SMALL_FILES = 2000
SMALL_SIZE = 8 * 1024
BIG_SIZE = 300 * 2**20
CHANGED = 10


class Sandbox:
    """sshd + latency proxy + ssh config + crimpl connections, all under one temp folder."""

    def __init__(self, delay_ms, lifetime):
        self.work = Path(tempfile.mkdtemp(prefix="crimpl-bench-", dir="/tmp"))
        self.key = make_client_key(self.work)
        private, self.host_public = generate_host_key()
        self.sshd = Sshd(self.work / "sshd", private, self.key.with_suffix(".pub").read_text())
        self.sshd.start()
        self.proxy, self.port = latency_proxy.spawn(self.sshd.port, delay_ms, lifetime=lifetime)
        known = self.work / "known_hosts"
        known.write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        self.config = self.work / "ssh_config"
        self.config.write_text(
            "Host bench\n"
            "  HostName 127.0.0.1\n"
            f"  Port {self.port}\n"
            f"  User {getpass.getuser()}\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  LogLevel ERROR\n"
            # Nothing may leave the machine: every other name goes nowhere.
            "Host *\n  HostName 127.0.0.1\n  Port 9\n"
        )
        self.ssh = f"ssh -F {shlex.quote(str(self.config))}"

    def connection(self):
        """A fresh fabric Connection through the proxy that verifies the pinned host key."""
        conn = ssh.connection("127.0.0.1", getpass.getuser(), self.key, "bench-sshd",
                              expected_key=hostkeys.key_from_line(self.host_public), port=self.port)
        return conn

    def close(self):
        self.proxy.terminate()
        try:
            self.proxy.wait(10)
        except subprocess.TimeoutExpired:
            self.proxy.kill()
        self.sshd.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def run(command, timeout=None):
    """Run a shell command; on timeout kill its whole process group and return False."""
    process = subprocess.Popen(command, shell=True, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return False
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode}): {err.decode()[-500:]}")
    return True


def timed(action):
    """Seconds ``action()`` took, or None if it reported a timeout by returning False."""
    start = time.perf_counter()
    ok = action()
    elapsed = time.perf_counter() - start
    return None if ok is False else elapsed


def crimpl_op(box, op, *args, check=None):
    def action():
        conn = box.connection()
        try:
            report = op(conn, *args, quiet=True)
        finally:
            conn.close()
        if check is not None:
            check(report)
    return action


def expect(**counts):
    def check(report):
        for name, value in counts.items():
            if getattr(report, name) != value:
                raise AssertionError(f"crimpl report {name}={getattr(report, name)}, expected {value}")
    return check


def make_small_tree(root):
    """2,000 files of 8 KiB of random bytes in 20 folders."""
    for i in range(SMALL_FILES):
        path = root / f"d{i // 100:02d}" / f"f{i % 100:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(SMALL_SIZE))
    return root


def make_big_file(path):
    with open(path, "wb") as handle:
        for _ in range(BIG_SIZE // 2**20):
            handle.write(os.urandom(2**20))
    return path


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- scenarios


def scenario_first_upload(box, data, runs, scp_cap):
    src, remote = data["small"], box.work / "remote" / "s1"
    q = shlex.quote
    tools = {
        "crimpl": lambda i: crimpl_op(box, transfer.upload, [src], str(remote / f"crimpl{i}"),
                                      check=expect(files_sent=SMALL_FILES)),
        "tar|ssh": lambda i: lambda: run(
            f"tar -C {q(str(src.parent))} -cf - {src.name} | {box.ssh} bench "
            + q(f"mkdir -p {remote}/tar{i} && tar -C {remote}/tar{i} -xf -")),
        "rsync": lambda i: lambda: run(
            f"rsync -a -e {q(box.ssh)} {q(str(src))} bench:{remote}/rsync{i}/"),
        "scp": lambda i: lambda: run(
            f"scp -q -r -F {q(str(box.config))} {q(str(src))} bench:{remote}/scp{i}",
            timeout=scp_cap),
    }
    remote.mkdir(parents=True)
    times = measure(tools, runs, once={"scp"})
    fresh(remote)
    return times


def scenario_reupload(box, data, runs):
    src, remote = data["small"], box.work / "remote" / "s2"
    q = shlex.quote
    remote.mkdir(parents=True)
    # Both start from a completed first upload (not timed).
    crimpl_op(box, transfer.upload, [src], str(remote / "crimpl"))()
    run(f"rsync -a -e {q(box.ssh)} {q(str(src))} bench:{remote}/rsync/")
    tools = {
        "crimpl": lambda i: crimpl_op(box, transfer.upload, [src], str(remote / "crimpl"),
                                      check=expect(files_sent=0, files_skipped=SMALL_FILES)),
        "rsync": lambda i: lambda: run(f"rsync -a -e {q(box.ssh)} {q(str(src))} bench:{remote}/rsync/"),
    }
    unchanged = measure(tools, runs)
    files = sorted(p for p in src.rglob("*.bin"))

    def change(i):
        for path in files[i * CHANGED:(i + 1) * CHANGED]:
            path.write_bytes(os.urandom(SMALL_SIZE))

    tools["crimpl"] = lambda i: crimpl_op(box, transfer.upload, [src], str(remote / "crimpl"),
                                          check=expect(files_sent=CHANGED))
    changed = measure(tools, runs, before_run=change)
    return unchanged, changed


def scenario_big(box, data, runs):
    big, remote, local = data["big"], box.work / "remote" / "s3", box.work / "local" / "s3"
    q = shlex.quote
    up = {
        "crimpl": lambda i: crimpl_op(box, transfer.upload, [big], str(remote / f"crimpl{i}"),
                                      check=expect(bytes_sent=BIG_SIZE)),
        "cat|ssh": lambda i: lambda: run(
            f"cat {q(str(big))} | {box.ssh} bench " + q(f"mkdir -p {remote}/cat{i} && cat > {remote}/cat{i}/big.bin")),
        "rsync": lambda i: lambda: run(f"rsync -a -e {q(box.ssh)} {q(str(big))} bench:{remote}/rsync{i}/"),
        "scp": lambda i: lambda: run(f"scp -q -F {q(str(box.config))} {q(str(big))} bench:{remote}/scp{i}.bin"),
    }

    def reset():
        fresh(remote).mkdir(parents=True)
        fresh(local).mkdir(parents=True)

    reset()
    uploads = measure(up, runs, cleanup=reset)
    # Downloads read the big file where it is: the "server" is this machine.
    down = {
        "crimpl": lambda i: crimpl_op(box, transfer.download, str(big.parent), big.name,
                                      str(local / f"crimpl{i}.bin"), check=expect(bytes_sent=BIG_SIZE)),
        "cat|ssh": lambda i: lambda: run(f"{box.ssh} bench {q('cat ' + str(big))} > {local}/cat{i}.bin"),
        "rsync": lambda i: lambda: run(f"rsync -a -e {q(box.ssh)} bench:{big} {local}/rsync{i}.bin"),
        "scp": lambda i: lambda: run(f"scp -q -F {q(str(box.config))} bench:{big} {local}/scp{i}.bin"),
    }
    downloads = measure(down, runs, cleanup=reset)
    return uploads, downloads


def scenario_fetch(box, data, runs, scp_cap):
    outputs, local = data["outputs"], box.work / "local" / "s4"
    q = shlex.quote
    tools = {
        "crimpl": lambda i: crimpl_op(box, transfer.download, str(outputs), "out",
                                      str(local / f"crimpl{i}") + "/", check=expect(files_sent=SMALL_FILES)),
        "tar|ssh": lambda i: lambda: run(
            f"mkdir -p {local}/tar{i} && {box.ssh} bench {q(f'tar -C {outputs} -cf - out')} "
            f"| tar -C {local}/tar{i} -xf -"),
        "rsync": lambda i: lambda: run(f"rsync -a -e {q(box.ssh)} bench:{outputs}/out {local}/rsync{i}/"),
        "scp": lambda i: lambda: run(
            f"mkdir -p {local}/scp{i} && scp -q -r -F {q(str(box.config))} bench:{outputs}/out {local}/scp{i}/",
            timeout=scp_cap),
    }
    local.mkdir(parents=True)
    times = measure(tools, runs, once={"scp"})
    fresh(local)
    return times


def measure(tools, runs, once=(), before_run=None, cleanup=None):
    """Run every tool ``runs`` times, alternating tools; return ``{tool: [seconds or None]}``.

    :param once: tools that run in the first round only.
    :param before_run: called with the run index before each round (not timed).
    :param cleanup: called after each round (not timed).
    """
    times = {name: [] for name in tools}
    for i in range(runs):
        if before_run is not None:
            before_run(i)
        for name, make in tools.items():
            if name in once and i > 0:
                continue
            # Start every timing with no dirty pages: the disk flushing the
            # previous tool's files would otherwise slow down the next one.
            os.sync()
            times[name].append(timed(make(i)))
            print(f"    {name:8s} run {i + 1}: {fmt(times[name][-1])}", flush=True)
        if cleanup is not None:
            cleanup()
    return times


# --------------------------------------------------------------------------- report


def median(values):
    if not values or any(v is None for v in values):
        return None  # stopped at the cap: slower than the cap, no median
    return statistics.median(values)


def fmt(seconds):
    return "—" if seconds is None else f"{seconds:.2f} s"


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    def version(command):
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        return (done.stdout.strip() or done.stderr.strip() or "unknown").splitlines()[0]

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "openssh": version("ssh -V"),
        "rsync": version("rsync --version"),
        "paramiko": paramiko.__version__,
        "kernel": platform.release(),
    }


def summarise(results):
    """Rows: scenario, medians per tool, best peer, ratio to best peer, target check."""
    rows = []
    mib = BIG_SIZE / 2**20
    for key, label, times, target_tool, kind in [
        ("first_upload", f"(1) first upload, {SMALL_FILES} x 8 KiB", results["first_upload"], "tar|ssh", "time1.2"),
        ("reupload_unchanged", "(2a) re-upload, nothing changed", results["reupload_unchanged"], "rsync", "time1.0"),
        ("reupload_changed", f"(2b) re-upload, {CHANGED} files changed", results["reupload_changed"], "rsync", "time1.0"),
        ("big_up", "(3a) 300 MiB file up", results["big_up"], "cat|ssh", "rate0.8"),
        ("big_down", "(3b) 300 MiB file down", results["big_down"], "cat|ssh", "rate0.8"),
        ("fetch", f"(4) fetch {SMALL_FILES} x 8 KiB outputs", results["fetch"], "tar|ssh", "time1.2"),
    ]:
        medians = {tool: median(values) for tool, values in times.items()}
        peers = {t: m for t, m in medians.items() if t != "crimpl" and m is not None}
        best = min(peers, key=peers.get)
        crimpl = medians["crimpl"]
        ref = medians[target_tool]
        if kind == "rate0.8":
            value = ref / crimpl  # throughput ratio crimpl / reference
            met = value >= 0.8
            target = f"throughput >= 0.8x {target_tool}"
        else:
            limit = float(kind[4:])
            value = crimpl / ref
            met = value <= limit
            target = f"time <= {limit:g}x {target_tool}"
        row = {
            "scenario": key, "label": label,
            "runs": times,
            "median_s": medians,
            "best_peer": best, "ratio_to_best_peer": crimpl / peers[best],
            "target": target, "target_value": value, "target_met": met,
        }
        if key.startswith("big"):
            row["throughput_MiB_s"] = {t: (mib / m if m else None) for t, m in medians.items()}
        for tool, values in times.items():
            if values and values[-1] is None:
                row.setdefault("stopped_at_cap", []).append(tool)
        rows.append(row)
    return rows


def print_table(rows, tools, scp_cap):
    header = f"{'scenario':40s}" + "".join(f"{t:>10s}" for t in tools) + f"{'crimpl/best':>13s}  target"
    print(header)
    print("-" * len(header) + "-" * 30)
    for row in rows:
        cells = []
        for tool in tools:
            if tool not in row["median_s"]:
                cells.append(f"{'':>10s}")
            elif row["median_s"][tool] is None:
                cells.append(f"{'>' + str(int(scp_cap)) + ' s':>10s}")
            else:
                cells.append(f"{row['median_s'][tool]:>8.2f} s")
        verdict = "met" if row["target_met"] else "MISSED"
        print(f"{row['label']:40s}" + "".join(cells)
              + f"{row['ratio_to_best_peer']:>12.2f}x  {row['target']}: {row['target_value']:.2f} {verdict}")
        if "throughput_MiB_s" in row:
            rates = "".join(f"{(f'{v:.0f} MiB/s' if v else ''):>10s}" if t in row["median_s"] else f"{'':>10s}"
                            for t, v in ((t, row["throughput_MiB_s"].get(t)) for t in tools))
            print(f"{'':40s}{rates}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=20.0, help="latency added each way (0: raw loopback)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and scenario (median reported)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--scp-cap", type=float, default=60.0,
                        help="stop scp -r on 2,000 files after this many seconds (it runs once)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    box = Sandbox(args.delay_ms, lifetime=3600)
    try:
        print(f"sandbox in {box.work}; sshd :{box.sshd.port}, proxy :{box.port} (+{args.delay_ms:g} ms each way)")
        data = {
            "small": make_small_tree(box.work / "local" / "small"),
            "big": make_big_file(box.work / "local" / "big.bin"),
            "outputs": box.work / "remote" / "outputs",
        }
        make_small_tree(data["outputs"] / "out")
        results = {}
        print("(1) first upload")
        results["first_upload"] = scenario_first_upload(box, data, args.runs, args.scp_cap)
        print("(2) re-upload")
        results["reupload_unchanged"], results["reupload_changed"] = scenario_reupload(box, data, args.runs)
        print("(3) 300 MiB up and down")
        results["big_up"], results["big_down"] = scenario_big(box, data, args.runs)
        print("(4) fetch outputs")
        results["fetch"] = scenario_fetch(box, data, args.runs, args.scp_cap)
    finally:
        box.close()

    rows = summarise(results)
    tools = ["crimpl", "tar|ssh", "cat|ssh", "rsync", "scp"]
    print()
    print(f"medians of {args.runs} runs, +{args.delay_ms:g} ms each way; scp -r on 2,000 files: one run, "
          f"stopped after {args.scp_cap:g} s")
    print_table(rows, tools, args.scp_cap)
    info = machine()
    elapsed = time.monotonic() - started
    print(f"\nmachine: {info['nproc']} x {info['cpu']}; {info['openssh']}; {info['rsync']}; "
          f"paramiko {info['paramiko']}; benchmark took {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "delay_ms": args.delay_ms, "runs": args.runs, "scp_cap_s": args.scp_cap,
            "machine": info, "elapsed_s": elapsed, "scenarios": rows,
        }, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
