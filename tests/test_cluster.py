"""One job over the nodes of a server (crimpl.cluster), with real node-to-node traffic on loopback.

Each node of the 3-node server is its own sshd, listening on the node's private IP
(``127.<k>.1.x:22``, from a loopback subnet moto_server launches into) with the
host key crimpl pinned for that instance and its own ``~/.ssh/authorized_keys``:
rank 0 reaches the others only with the key crimpl installed, and only if their
host keys are the pinned ones. This machine reaches each node through the
``ssh_routes`` config, as through a bastion.
"""

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox import SSH_CIDRS, Background, Sshd, instance_host_key, kill_sessions, processes_with, wait_until

import crimpl
from crimpl import cluster
from crimpl.errors import JobError

NODES = 3


def _job_processes(root):
    """Pids of the processes whose working folder is under ``root`` (the nodes' homes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(root)):
                pids.append(int(entry.name))
    return pids


class Cluster:
    """A server of :data:`NODES` nodes, each served by its own sshd on its private IP."""

    def __init__(self, server, sshds, homes, ips, root):
        self.server, self.sshds, self.homes, self.ips, self.root = server, sshds, homes, ips, root

    def job_dir(self, rank, job):
        return self.homes[rank] / "crimpl" / "jobs" / job.job_name


@pytest.fixture
def cluster_server(aws, cluster_network, key_file, ssh_routes, tmp_path, login_user):
    """A 3-node server in a loopback subnet, every node running its own sshd (see the module)."""
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_cidrs=SSH_CIDRS,
                                  SubnetId=cluster_network.subnet_id, use_private_ip=True, ssh_timeout=20)
    server = crimpl.AWSEC2.new(config, nprocs=2, nnodes=NODES, server_name="cl")
    nodes = server.nodes
    root = tmp_path / "nodes"
    sshds, homes, ips = [], [], []
    try:
        for node in nodes:
            ip = node.private_ip
            home = root / f"node-{node.rank}" / "home"
            authorized = home / ".ssh" / "authorized_keys"
            authorized.parent.mkdir(parents=True)
            authorized.write_text(key_file.with_suffix(".pub").read_text())
            sshd = Sshd(root / f"node-{node.rank}" / "sshd", instance_host_key(node.instanceId, aws.environ()),
                        key_file.with_suffix(".pub").read_text(), home=home, listen=[f"{ip}:22"],
                        env={"CRIMPL_TEST_INSTANCE": node.instanceId})
            # The node's own authorized_keys: the cluster key has to be installed there to get in.
            sshd.authorized_keys = authorized
            ssh_routes.add(ip, sshd.port)
            sshds.append(sshd.start())
            homes.append(home)
            ips.append(ip)
        yield Cluster(server, sshds, homes, ips, root)
    finally:
        for pid in _job_processes(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for sshd in sshds:
            sshd.stop()


def _script(tmp_path, body, name="job.sh"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _final(job, timeout=60):
    return job.wait(timeout=timeout, interval=0.2)


# -- ranks and their variables --------------------------------------------------------------


def test_every_rank_runs_on_its_own_node_with_the_same_node_list_and_master(cluster_server, tmp_path):
    script = _script(tmp_path, """\
        {
          echo "rank=$CRIMPL_NODE_RANK"
          echo "num=$CRIMPL_NUM_NODES"
          echo "master=$CRIMPL_MASTER_ADDR"
          echo "nprocs=$CRIMPL_NPROCS_PER_NODE"
          echo "ips=$(printf '%s' "$CRIMPL_NODE_IPS" | tr '\\n' ,)"
          echo "hostfile=$(paste -sd , "$CRIMPL_HOSTFILE")"
          echo "home=$HOME"
        } > env.txt
    """)
    job = cluster_server.server.submit_script(script, nprocs_per_node=4)
    status = _final(job)
    assert status.state == "complete", status
    assert [(r.rank, r.state, r.exit_code) for r in status.ranks] == [(0, "complete", 0), (1, "complete", 0),
                                                                       (2, "complete", 0)]
    reports = cluster_server.server.check_output("env.txt", tmp_path / "out", job=job, all_ranks=True)
    assert sorted(reports) == [0, 1, 2]
    ips = cluster_server.ips
    for rank in range(NODES):
        lines = (tmp_path / "out" / f"rank-{rank}" / "env.txt").read_text().splitlines()
        env = dict(line.split("=", 1) for line in lines)
        assert env["rank"] == str(rank)
        assert env["num"] == str(NODES)
        assert env["master"] == ips[0]
        assert env["ips"] == ",".join(ips)
        assert env["nprocs"] == "4"
        assert env["hostfile"] == ",".join(f"{ip} slots=4" for ip in ips)
        # Each rank ran on its own node: that node's sshd gave its sessions that node's home.
        assert env["home"] == str(cluster_server.homes[rank])


def test_a_rendezvous_on_the_master_address_completes_across_the_nodes(cluster_server, tmp_path):
    program = _script(tmp_path, """\
        import os, socket, time
        rank, n = int(os.environ["CRIMPL_NODE_RANK"]), int(os.environ["CRIMPL_NUM_NODES"])
        master = (os.environ["CRIMPL_MASTER_ADDR"], 29517)
        if rank == 0:
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(master)
            server.listen()
            peers = []
            for _ in range(n - 1):
                conn, _ = server.accept()
                peers.append((conn, int(conn.recv(16))))
            ranks = ",".join(str(r) for r in sorted([0] + [r for _, r in peers]))
            for conn, _ in peers:
                conn.sendall(ranks.encode())
                conn.close()
            print("rank 0 met", ranks)
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = socket.create_connection(master, timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            conn.sendall(str(rank).encode())
            print(f"rank {rank} met", conn.recv(64).decode())
    """, name="rendezvous.py")
    job = cluster_server.server.submit_script(["python3 rendezvous.py"], files=[program])
    assert _final(job).state == "complete"
    logs = cluster_server.server.rank_logs(job, all_ranks=True)
    assert sorted(logs.splitlines()) == ["[rank 0] rank 0 met 0,1,2", "[rank 1] rank 1 met 0,1,2",
                                         "[rank 2] rank 2 met 0,1,2"]


def test_open_mpi_runs_one_process_on_every_node_over_crimpls_node_to_node_ssh(cluster_server, tmp_path):
    script = _script(tmp_path, """\
        if [ "$CRIMPL_NODE_RANK" = 0 ]; then
          mpirun --allow-run-as-root --hostfile "$CRIMPL_HOSTFILE" -np "$CRIMPL_NUM_NODES" --map-by node \\
            --mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \\
            python3 -c 'import os; print("mpi", os.environ["OMPI_COMM_WORLD_RANK"], "of", os.environ["OMPI_COMM_WORLD_SIZE"], "home", os.environ["HOME"])'
        fi
    """)
    job = cluster_server.server.submit_script(script)
    status = _final(job, timeout=120)
    log = job.logs()
    assert status.state == "complete", log
    lines = sorted(line for line in log.splitlines() if line.startswith("mpi "))
    assert [line.split()[1] for line in lines] == ["0", "1", "2"]
    assert all(line.split()[3] == "3" for line in lines)
    # One process on each node: each node's sshd gives its sessions that node's home.
    assert sorted(line.split()[5] for line in lines) == sorted(str(home) for home in cluster_server.homes)


ALLREDUCE_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int rank, size, sum = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d sees sum %d home %s\n", rank, size, sum, getenv("HOME"));
    MPI_Finalize();
    return 0;
}
"""


def test_an_mpi_allreduce_compiled_with_mpicc_sums_the_ranks_of_every_node(cluster_server, tmp_path):
    source = tmp_path / "allreduce.c"
    source.write_text(ALLREDUCE_C)
    binary = tmp_path / "allreduce"
    subprocess.run(["mpicc", "-O2", "-o", str(binary), str(source)], check=True, capture_output=True)
    # mpirun starts the other nodes' processes in their homes (rank 0's job folder is elsewhere on
    # them), so each runs the copy that crimpl fanned out to its own job folder.
    script = _script(tmp_path, """\
        if [ "$CRIMPL_NODE_RANK" = 0 ]; then
          mpirun --allow-run-as-root --hostfile "$CRIMPL_HOSTFILE" -np "$CRIMPL_NUM_NODES" --map-by node \\
            --mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \\
            sh -c 'exec "$HOME/$1/allreduce"' sh "${PWD#"$HOME"/}"
        fi
    """)
    job = cluster_server.server.submit_script(script, files=[binary])
    status = _final(job, timeout=120)
    log = job.logs()
    assert status.state == "complete", log
    lines = sorted(line.split() for line in log.splitlines() if line.startswith("rank "))
    assert [(int(words[1]), words[3], words[6]) for words in lines] == [(r, "3", "3") for r in range(NODES)]
    # The sum went between processes on different nodes: each node's sshd gives its sessions its home.
    assert sorted(words[8] for words in lines) == sorted(str(home) for home in cluster_server.homes)


# -- one job, N ranks: failure, kill ----------------------------------------------------------


def test_a_failed_rank_fails_the_job_with_every_ranks_code_and_ends_the_others(cluster_server, tmp_path):
    script = _script(tmp_path, """\
        if [ "$CRIMPL_NODE_RANK" = 1 ]; then exit 3; fi
        sleep 987
    """)
    job = cluster_server.server.submit_script(script)
    status = _final(job)
    assert status.state == "failed"
    assert status.exit_code == 3
    by_rank = {r.rank: (r.state, r.exit_code) for r in status.ranks}
    assert by_rank[1] == ("failed", 3)
    assert by_rank[0][0] == by_rank[2][0] == "killed"
    assert by_rank[0][1] in (143, 137) and by_rank[2][1] in (143, 137)
    assert status.detail.startswith("rank 1 exit 3; ranks 0, 2 killed")
    assert "rank 1 exit 3" in str(status)
    wait_until(lambda: not processes_with(b"sleep\x00987"), timeout=20, what="every rank ended")


def test_a_node_that_stops_answering_is_lost_and_the_others_are_ended(cluster_server):
    job = cluster_server.server.submit_script(["sleep 984"])
    wait_until(lambda: len(processes_with(b"sleep\x00984")) == NODES, timeout=30, what="every rank running")
    # Every rank started, as the supervisor saw it (it now watches them).
    wait_until((cluster_server.job_dir(0, job) / "crimpl-cluster" / "started").exists, timeout=30,
               what="the supervisor watching the ranks")
    # Node 2 no longer answers; its rank runs on, out of reach. Its listener is frozen first (no
    # connection gets in from then on), then its open connections end (sshd's per-connection
    # processes have sessions of their own: stopping the listener alone would leave the
    # supervisor's watch connected), then the listener.
    sshd = cluster_server.sshds[2]
    os.kill(sshd.process.pid, signal.SIGSTOP)
    kill_sessions(sshd)
    os.killpg(sshd.process.pid, signal.SIGKILL)
    sshd.process.wait()
    sshd.stop()
    # Bounded: the supervisor's retries and the kill of the others take longer on a loaded machine.
    status = _final(job, timeout=120)
    assert status.state == "failed"
    assert status.exit_code is None
    assert [(r.rank, r.state) for r in status.ranks] == [(0, "killed"), (1, "killed"), (2, "lost")]
    assert status.detail.startswith("rank 2 lost")


def test_kill_ends_every_rank(cluster_server, tmp_path):
    job = cluster_server.server.submit_script(["sleep 986"])
    wait_until(lambda: len(processes_with(b"sleep\x00986")) == NODES, timeout=30, what="every rank running")
    assert job.status().state == "running"
    assert job.kill() is True
    status = job.status()
    assert status.state == "killed"
    assert [r.state for r in status.ranks] == ["killed"] * NODES
    assert not processes_with(b"sleep\x00986")
    assert job.kill() is False


def test_a_kill_right_after_the_submit_ends_the_ranks_still_starting(cluster_server):
    job = cluster_server.server.submit_script(["sleep 985"])
    assert job.kill() is True
    status = job.status()
    assert status.state == "killed"
    assert len(status.ranks) == NODES
    # Any rank that started is gone; none starts later.
    wait_until(lambda: not processes_with(b"sleep\x00985"), timeout=20, what="no rank left")
    assert job.wait(timeout=10).state == "killed"
    assert not processes_with(b"sleep\x00985")


# -- logs and outputs per rank ------------------------------------------------------------------


def test_logs_and_outputs_come_from_rank_0_by_default_and_from_any_rank_on_request(cluster_server, tmp_path):
    server = cluster_server.server
    job = server.submit_script(['echo "hello from $CRIMPL_NODE_RANK"', 'echo "out $CRIMPL_NODE_RANK" > out.txt'])
    assert _final(job).state == "complete"
    assert job.logs() == "hello from 0\n"
    assert server.rank_logs(job.job_name, rank=2) == "hello from 2\n"
    assert server.rank_logs(job, all_ranks=True) == "".join(f"[rank {r}] hello from {r}\n" for r in range(NODES))
    job.check_output("out.txt", f"{tmp_path}/default/")
    assert (tmp_path / "default" / "out.txt").read_text() == "out 0\n"
    server.check_output("out.txt", f"{tmp_path}/one/", job=job, rank=1)
    assert (tmp_path / "one" / "out.txt").read_text() == "out 1\n"
    server.check_output("out.txt", tmp_path / "all", job=job, all_ranks=True)
    assert [(tmp_path / "all" / f"rank-{r}" / "out.txt").read_text() for r in range(NODES)] == \
        [f"out {r}\n" for r in range(NODES)]
    with pytest.raises(JobError, match="rank must be a node"):
        server.rank_logs(job, rank=NODES)


def test_following_the_log_goes_on_until_every_rank_ended(cluster_server, tmp_path):
    # Rank 0 ends at once; the job, and the follow, go on until rank 2 has ended too.
    script = _script(tmp_path, """\
        echo "rank $CRIMPL_NODE_RANK says hello"
        if [ "$CRIMPL_NODE_RANK" = 2 ]; then
          while [ ! -e "$HOME/go" ]; do sleep 0.1; done
        fi
    """)
    job = cluster_server.server.submit_script(script)
    follow = Background(lambda: job.logs(follow=True, stream=io.StringIO()))
    rank0 = cluster_server.job_dir(0, job) / "crimpl-status"
    wait_until(lambda: rank0.exists() and '"complete"' in rank0.read_text(), timeout=30, what="rank 0 ended")
    assert job.status().state == "running"
    assert not follow.done
    (cluster_server.homes[2] / "go").touch()
    wait_until(lambda: follow.done, timeout=30, what="the follow ended")
    assert follow.error is None
    assert follow.result == "rank 0 says hello\n"
    assert job.status().state == "complete"


# -- inputs cross the client's link once ----------------------------------------------------


def test_inputs_cross_the_clients_link_once_and_reach_every_node_from_rank_0(cluster_server, tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 * 2**20))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    job = cluster_server.server.submit_script(["sha256sum data.bin > sum.txt"], files=[data])
    report = job.upload_report
    assert isinstance(report, cluster.FanOutReport)
    # The client sent the input once, to rank 0 (with crimpl's few small files) ...
    assert data.stat().st_size <= report.bytes_sent < data.stat().st_size + 2**16
    # ... and rank 0 sent it on to each other node.
    assert sorted(report.fanout_bytes) == [1, 2]
    assert all(size > data.stat().st_size for size in report.fanout_bytes.values())
    assert _final(job).state == "complete"
    for rank in range(NODES):
        assert (cluster_server.job_dir(rank, job) / "sum.txt").read_text().split()[0] == digest


def test_the_node_key_lives_only_on_rank_0_and_the_nodes_are_known_by_their_pinned_keys(
        cluster_server, tmp_path, crimpl_home):
    from crimpl import hostkeys

    job = cluster_server.server.submit_script(["true"])
    assert _final(job).state == "complete"
    ssh_dir = [home / "crimpl" / "cluster" for home in cluster_server.homes]
    private = ssh_dir[0] / "id_ed25519"
    assert private.stat().st_mode & 0o777 == 0o600
    assert not (ssh_dir[1] / "id_ed25519").exists() and not (ssh_dir[2] / "id_ed25519").exists()
    public = (ssh_dir[0] / "id_ed25519.pub").read_text().split()[:2]
    for home in cluster_server.homes:
        assert " ".join(public) in (home / ".ssh" / "authorized_keys").read_text()
    # Nothing of the key on this machine.
    assert not any(b"PRIVATE KEY" in path.read_bytes() for path in crimpl_home.rglob("*") if path.is_file())
    known = (ssh_dir[0] / "known_hosts").read_text().splitlines()
    for node, ip in zip(cluster_server.server.nodes, cluster_server.ips):
        pinned = [hostkeys.public_line(k) for k in hostkeys.pinned_keys(node.instanceId)]
        assert sorted(line.split(" ", 1)[1] for line in known if line.split()[0] == ip) == sorted(pinned)
    config = (ssh_dir[0] / "ssh_config").read_text()
    assert "StrictHostKeyChecking yes" in config


def test_a_cluster_already_prepared_is_reached_through_rank_0_alone(cluster_server):
    from crimpl import ssh

    first = cluster_server.server.submit_script(["true"])
    assert _final(first).state == "complete"
    with ssh.counted() as trips:
        second = cluster_server.server.submit_script(["true"])
    # The key is authorized on every node already: no connection to the other nodes.
    assert trips.connections == 1
    assert _final(second).state == "complete"


def test_a_node_that_lost_the_key_fails_one_submit_and_the_next_authorizes_it_again(cluster_server):
    first = cluster_server.server.submit_script(["true"])
    assert _final(first).state == "complete"
    authorized = cluster_server.homes[2] / ".ssh" / "authorized_keys"
    authorized.write_text("".join(line for line in authorized.read_text().splitlines(keepends=True)
                                  if "crimpl-cluster-" not in line))

    with pytest.raises(JobError, match=r"to node 2 .* submit again with job_name='again'"):
        cluster_server.server.submit_script(["true"], job_name="again")
    job = cluster_server.server.submit_script(["true"], job_name="again")
    assert _final(job).state == "complete"
    assert "crimpl-cluster-" in authorized.read_text()


def test_a_node_that_offers_another_host_key_to_rank_0_stops_the_submit(cluster_server, tmp_path, key_file):
    from crimpl.hostkeys import generate_host_key

    # Node 2 answers this machine with its pinned key, but rank 0 finds an impostor on its private IP.
    node2 = cluster_server.sshds[2]
    node2.stop()
    node2.listen = []
    node2.start()
    impostor = Sshd(tmp_path / "impostor", generate_host_key()[0], key_file.with_suffix(".pub").read_text(),
                    home=tmp_path / "impostor-home", listen=[f"{cluster_server.ips[2]}:22"])
    impostor.authorized_keys = cluster_server.homes[2] / ".ssh" / "authorized_keys"
    impostor.start()
    try:
        with pytest.raises(JobError, match=r"node 2 .*Host key verification failed"):
            cluster_server.server.submit_script(["true"], job_name="never")
    finally:
        impostor.stop()
    assert not (tmp_path / "impostor-home" / "crimpl" / "jobs" / "never").exists()


def test_options_of_one_node_are_refused_before_anything_is_sent(cluster_server):
    with pytest.raises(JobError, match="array is for servers of one node"):
        cluster_server.server.submit_script(["true"], array="0-3")
    with pytest.raises(JobError, match="nprocs_per_node must be a whole number"):
        cluster_server.server.submit_script(["true"], nprocs_per_node=0)
    assert cluster_server.server.job_statuses() == {}


def test_resubmit_runs_every_rank_again_with_the_changed_inputs(cluster_server, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("first\n")
    job = cluster_server.server.submit_script(['cp data.txt "seen-$CRIMPL_NODE_RANK.txt"'], files=[data])
    assert _final(job).state == "complete"
    data.write_text("second\n")
    again = job.resubmit(files=[data])
    assert sorted(again.upload_report.fanout_bytes) == [1, 2]
    assert _final(again).state == "complete"
    for rank in range(NODES):
        assert (cluster_server.job_dir(rank, job) / f"seen-{rank}.txt").read_text() == "second\n"


# -- on_complete ------------------------------------------------------------------------------


def test_on_complete_stops_every_node_once_every_rank_ended(cluster_server, tmp_path, aws):
    record = tmp_path / "shutdowns.txt"
    fake = tmp_path / "fake-shutdown.py"
    # Stands in for `sudo shutdown -h now` on each node: records the call, then does what EC2
    # does on an instance-initiated shutdown of that node (its id comes from its sshd).
    fake.write_text(textwrap.dedent(f"""
        import os, boto3
        instance = os.environ["CRIMPL_TEST_INSTANCE"]
        status = open("crimpl-status").read()
        with open({str(record)!r}, "a") as out:
            out.write(instance + " " + ("ended" if '"ended": "' in status else "running") + "\\n")
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url={aws.url!r},
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        ec2.stop_instances(InstanceIds=[instance])
    """))
    server = cluster_server.server
    server._config = crimpl.AWSEC2_Config(**{**server.config.to_dict(),
                                             "shutdown_command": f"{sys.executable} {fake}"})
    script = _script(tmp_path, """\
        if [ "$CRIMPL_NODE_RANK" = 2 ]; then while [ ! -e "$HOME/go" ]; do sleep 0.1; done; fi
    """)
    job = server.submit_script(script, on_complete="stop")
    rank0 = cluster_server.job_dir(0, job) / "crimpl-status"
    wait_until(lambda: rank0.exists() and '"complete"' in rank0.read_text(), timeout=30, what="rank 0 ended")
    # Rank 0 and 1 have ended, rank 2 runs: no node goes down yet.
    assert not record.exists()
    (cluster_server.homes[2] / "go").touch()
    ids = [node.instanceId for node in server.nodes]
    wait_until(lambda: all(crimpl.AWSEC2(i).state == "stopped" for i in ids), timeout=60, what="every node stopped")
    calls = [line.split() for line in record.read_text().splitlines()]
    # Each node once, rank 0 last, each after its rank ended.
    assert sorted(c[0] for c in calls) == sorted(ids)
    assert calls[-1][0] == ids[0]
    assert all(c[1] == "ended" for c in calls)


# -- the command line -------------------------------------------------------------------------


def test_the_cli_shows_one_rank_or_every_rank_and_fetches_per_rank(cluster_server, tmp_path):
    from cli_helper import run_cli

    server = cluster_server.server
    server.config.save("default")
    job = server.submit_script(['echo "hi from $CRIMPL_NODE_RANK"', 'echo "$CRIMPL_NODE_RANK" > r.txt'])
    assert _final(job).state == "complete"
    where = ("--instance-id", server.instanceId)
    one = run_cli("logs", job.job_name, "--rank", "1", *where, cwd=tmp_path)
    assert (one.code, one.stdout) == (0, "hi from 1\n")
    every = run_cli("logs", job.job_name, "--all-ranks", *where, cwd=tmp_path)
    assert every.stdout == "[rank 0] hi from 0\n[rank 1] hi from 1\n[rank 2] hi from 2\n"
    fetched = run_cli("fetch", "r.txt", "--job", job.job_name, "--all-ranks", "--dest", "res", *where, cwd=tmp_path)
    assert fetched.code == 0, fetched.stderr
    assert [(tmp_path / "res" / f"rank-{r}" / "r.txt").read_text() for r in range(NODES)] == ["0\n", "1\n", "2\n"]
    bad = run_cli("logs", job.job_name, "--rank", "two", *where, cwd=tmp_path)
    assert bad.code != 0 and "--rank takes a node's rank" in bad.stderr and "Traceback" not in bad.stderr


def test_ranks_stay_with_their_nodes_across_stop_and_start(cluster_server):
    server = cluster_server.server
    ids = [node.instanceId for node in server.nodes]
    server.stop()
    assert [crimpl.AWSEC2(i).state for i in ids] == ["stopped"] * NODES
    job = server.submit_script(['echo "$CRIMPL_NODE_RANK $CRIMPL_MASTER_ADDR" > rank.txt'])  # starts every node
    assert _final(job).state == "complete"
    assert [node.instanceId for node in server.nodes] == ids
    for rank in range(NODES):
        assert (cluster_server.job_dir(rank, job) / "rank.txt").read_text() == f"{rank} {cluster_server.ips[0]}\n"
