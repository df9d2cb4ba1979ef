"""Round trips of the user's calls: SSH connections and exec channels, counted on the wire.

Every call reports what it opened (``report.connections``, ``report.channels``); the
counts come from crimpl's paramiko Transport, which sees every exec channel, on a
real EC2 instance (moto_server + sshd) and an SSH host. What the tests pin:

- a submit of a script with or without inputs: one connection, one exec channel on
  EC2 (the check, the upload and the start are one remote command; an SSH host's
  session adds its ``mkdir`` of crimpl's folder);
- a fetch of the latest job: one connection (the lookup and the download share it);
- a ``connected()`` block and each ``crimpl`` task: one connection for all they do,
  closed when they end.
"""

import threading

import pytest

import crimpl
from cli_helper import run_cli
from crimpl import ssh
from crimpl.errors import JobError
from sandbox import wait_until


@pytest.fixture
def ec2_server(ec2_server):
    """The served EC2 instance of conftest, its host key already replaced."""
    # The first two connections replace the host key from the user data (commands of their own).
    for _ in range(2):
        ec2_server.job_statuses()
    assert ec2_server.tags["crimpl:host-key-rotated"] == "true"
    return ec2_server


@pytest.fixture(params=["ec2", "sshhost"])
def target(request, tmp_path):
    if request.param == "ec2":
        return request.getfixturevalue("ec2_server")
    request.getfixturevalue("ssh_host")
    return crimpl.RemoteThreadServer("workstation", directory=str(tmp_path / "remote-ssh"))


def _finish(job):
    return job.wait(timeout=30, interval=0.1)


def test_a_submit_without_inputs_is_one_connection_and_one_remote_command(target):
    job = target.submit_script(["echo one trip"])
    report = job.upload_report
    assert report.connections == 1
    assert report.channels == 1
    assert _finish(job).state == "complete"
    assert job.logs() == "one trip\n"


def test_a_submit_with_inputs_costs_no_more_round_trips(target, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        (data / f"f{i}.txt").write_text(f"{i}\n")
    job = target.submit_script(["cat data/f7.txt"], files=[data])
    assert (job.upload_report.connections, job.upload_report.channels) == (1, 1)
    assert job.upload_report.files_sent >= 20
    assert _finish(job).state == "complete"
    assert job.logs() == "7\n"


def test_a_submit_refused_by_the_one_command_sends_nothing(target, tmp_path):
    _finish(target.submit_script(["true"], job_name="taken"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2**20)
    with ssh.counted() as trips, pytest.raises(JobError, match="a job named taken already exists"):
        target.submit_script(["true"], files=[big], job_name="taken")
    assert (trips.connections, trips.channels) == (1, 1)
    # The job directory holds what the first submit sent, nothing of the refused one.
    assert "big.bin" not in target.get_job("taken").ls()


def test_a_refusal_because_another_job_runs_names_it_and_leaves_nothing(target, tmp_path):
    gate = tmp_path / "gate"
    blocker = target.submit_script([f"while [ ! -e {gate} ]; do sleep 0.05; done"], job_name="blocker")
    try:
        with pytest.raises(JobError, match=f"another job is running on {target}: blocker; "):
            target.submit_script(["true"], job_name="second")
        assert set(target.job_statuses()) == {"blocker"}
    finally:
        gate.touch()
    assert _finish(blocker).state == "complete"


def test_fetching_the_latest_job_is_one_connection(target, tmp_path):
    job = target.submit_script(["mkdir -p out", "echo result > out/r.txt"])
    assert _finish(job).state == "complete"
    with ssh.counted() as lookup:
        target.job_statuses()
    report = target.check_output("out/", tmp_path / "local-out")
    assert (tmp_path / "local-out" / "r.txt").read_text() == "result\n"
    assert report.connections == 1
    # The lookup of the latest job, then the download, on the lookup's connection.
    assert report.channels == lookup.channels + 1


def test_fetching_a_named_job_is_the_download_alone(target, tmp_path):
    job = target.submit_script(["mkdir -p out", "echo result > out/r.txt"])
    assert _finish(job).state == "complete"
    report = target.check_output("out/", tmp_path / "local-out", job=job.job_name)
    assert (tmp_path / "local-out" / "r.txt").read_text() == "result\n"
    # No listing of the jobs first: the download finds the job's folder itself.
    assert (report.connections, report.channels) == (1, 1)
    with pytest.raises(JobError, match=f"no job not-{job.job_name} on .*; jobs: {job.job_name}"):
        target.check_output("out/", tmp_path / "other", job=f"not-{job.job_name}")
    assert not (tmp_path / "other").exists()


def test_a_connected_block_shares_one_connection_and_closes_it_at_its_end(target, tmp_path):
    with ssh.counted() as trips, target.connected():
        job = target.submit_script(["echo shared"])
        _finish(job)
        statuses = target.job_statuses()
        text = job.logs()
        with target.session() as conn:
            held = conn
        assert held.is_connected
    assert trips.connections == 1
    assert statuses[job.job_name].state == "complete" and text == "shared\n"
    assert not held.is_connected


def test_a_connected_block_opens_a_new_connection_after_losing_one(ec2_server):
    with ssh.counted() as trips, ec2_server.connected():
        with ec2_server.session() as conn:
            conn.client.get_transport().close()
        wait_until(lambda: not conn.is_connected, timeout=10, what="the connection to close")
        assert ec2_server.job_statuses() == {}
    assert trips.connections == 2


def test_a_connected_block_belongs_to_its_thread(ec2_server):
    seen = {}
    with ec2_server.connected():
        with ec2_server.session() as conn:
            seen["main"] = conn

        def other():
            with ec2_server.session() as own:
                seen["thread"] = own

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(60)
    assert seen["thread"] is not seen["main"]


def test_the_logs_task_reads_the_job_and_its_log_over_one_connection(ec2_server):
    job = ec2_server.submit_script(["echo from the task"])
    _finish(job)
    with ssh.counted() as trips:
        result = run_cli("logs", job.job_name, "--instance-id", ec2_server.instanceId)
    assert result.code == 0, result.stderr
    assert result.stdout == "from the task\n"
    assert trips.connections == 1


def test_the_submit_command_is_one_connection_and_one_remote_command(ec2_server, tmp_path):
    (tmp_path / "run.sh").write_text("echo from the command line\n")
    with ssh.counted() as trips:
        result = run_cli("submit", "run.sh", "--instance-id", ec2_server.instanceId, cwd=tmp_path)
    assert result.code == 0, result.stderr
    # It says what the start answered, without another look.
    assert ": running (`" in result.stdout or ": complete (`" in result.stdout, result.stdout
    assert (trips.connections, trips.channels) == (1, 1)
    assert _finish(ec2_server.get_job()).state == "complete"


def test_a_transfer_called_alone_counts_its_one_channel(connect, tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("a\n")
    conn = connect()
    conn.open()
    report = crimpl.transfer.upload(conn, [source], str(tmp_path / "remote"))
    assert (report.connections, report.channels) == (0, 1)
    report = crimpl.transfer.download(conn, str(tmp_path / "remote"), "a.txt", str(tmp_path / "back.txt"))
    assert (report.connections, report.channels) == (0, 1)
    assert (tmp_path / "back.txt").read_text() == "a\n"


def test_a_resubmit_with_inputs_sends_them_and_starts_in_one_remote_command(ec2_server, tmp_path):
    data = tmp_path / "n.txt"
    data.write_text("1\n")
    job = ec2_server.submit_script(["cat n.txt"], files=[data], job_name="again")
    assert _finish(job).state == "complete"
    data.write_text("2\n")
    with ssh.counted() as lookup:
        ec2_server.job_statuses()
    job = ec2_server.resubmit("again", files=[data])
    # The job's state first (it must exist and not run), then the upload and the start together.
    assert (job.upload_report.connections, job.upload_report.channels) == (1, lookup.channels + 1)
    assert job.upload_report.files_sent == 1
    assert _finish(job).state == "complete"
    assert job.logs() == "2\n"


def test_a_session_asks_ec2_for_the_instance_once(ec2_server):
    calls = []
    ec2_server.ec2_client.meta.events.register(
        "before-call.ec2", lambda model, **kwargs: calls.append(model.name))
    with ec2_server.session() as conn:
        assert conn.is_connected
    # The state, the address and the host key's tag, from one answer.
    assert calls == ["DescribeInstances"]


def _shutdown_behaviour(server):
    answer = server.ec2_client.describe_instance_attribute(
        InstanceId=server.instanceId, Attribute="instanceInitiatedShutdownBehavior")
    return answer["InstanceInitiatedShutdownBehavior"]["Value"]


def test_a_refused_submit_with_on_complete_leaves_the_shutdown_behaviour_alone(ec2_server):
    _finish(ec2_server.submit_script(["true"], job_name="taken"))
    before = _shutdown_behaviour(ec2_server)
    assert before == "stop"
    with pytest.raises(JobError, match="a job named taken already exists"):
        ec2_server.submit_script(["true"], job_name="taken", on_complete="terminate")
    assert _shutdown_behaviour(ec2_server) == before
