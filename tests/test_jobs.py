"""The job protocol, on an EC2 instance (moto_server + a real sshd) and on the local target.

Every behaviour test runs on both targets: the local target must pass the same
job-protocol tests as a server reached over SSH. The second half puts the
protocol under faults: bad names and inputs, races, interruptions, lost servers;
connections are cut by killing the sshd's per-connection processes, as a network
failure or a stopped instance would.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import boto3
import pytest

import crimpl
from crimpl.errors import JobError, JobUnreachableError, ScriptFailedError
from sandbox import Background, processes_with, wait_until

TARGETS = ["local", "ec2", "sshhost"]


@pytest.fixture(params=TARGETS)
def target(request, tmp_path):
    if request.param == "local":
        return crimpl.Local(root=tmp_path / "local")
    if request.param == "sshhost":
        return _ssh_host_server(request, tmp_path)
    return request.getfixturevalue("ec2_server")


def _ssh_host_server(request, tmp_path):
    """A RemoteThreadServer on the test sshd, saved as ``jobs-test`` so another process finds it."""
    request.getfixturevalue("ssh_host")
    server = crimpl.RemoteThreadServer("workstation", directory=str(tmp_path / "remote-ssh"))
    server.save("jobs-test")
    return server


def _wait_final(job, timeout=30):
    return job.wait(timeout=timeout, interval=0.1)


# -- submit, status, logs ------------------------------------------------------------


def test_complete_job_reports_complete_and_its_outputs_come_back(target, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "numbers.txt").write_text("1\n2\n3\n")
    job = target.submit_script(
        ["echo hello from $CRIMPL_JOB_NAME", "mkdir -p results",
         "awk '{s+=$1} END {print s}' data/sub/numbers.txt > results/sum.txt"],
        files=[data],
    )
    status = _wait_final(job)
    assert status.state == "complete"
    assert status.exit_code == 0
    assert status.started and status.ended
    assert f"hello from {job.job_name}" in job.logs()
    out = tmp_path / "out"
    report = job.check_output("results/sum.txt", str(out) + "/")
    # Into a directory, a file lands under its basename (as with cp).
    assert (out / "sum.txt").read_text() == "6\n"
    assert report.replaced == []


def test_failed_script_is_reported_failed_with_its_exit_code(target, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("echo about to fail\nexit 3\n")
    job = target.submit_script(script)
    status = _wait_final(job)
    assert status.state == "failed"
    assert status.exit_code == 3
    assert job.job_status == "failed"
    assert target.job_status == "failed"


def test_a_failing_command_in_a_list_fails_the_job(target):
    job = target.submit_script(["false", "echo should not run"])
    status = _wait_final(job)
    assert status.state == "failed"
    assert "should not run" not in job.logs()


def test_script_with_a_shebang_runs_with_its_interpreter(target, tmp_path):
    script = tmp_path / "run.py"
    script.write_text("#!/usr/bin/env python3\nimport sys\nprint('python', sys.version_info[0])\n")
    job = target.submit_script(script)
    assert _wait_final(job).state == "complete"
    assert "python 3" in job.logs()


def test_run_script_streams_output_and_returns_zero(target):
    stream = io.StringIO()
    code = target.run_script(["echo first", "echo second"], stream=stream)
    assert code == 0
    assert "first\nsecond" in stream.getvalue()


def test_run_script_raises_with_the_exit_code_and_last_lines(target):
    with pytest.raises(ScriptFailedError) as info:
        target.run_script(["echo the last words", "exit 7"], stream=io.StringIO())
    assert info.value.exit_code == 7
    assert "the last words" in info.value.tail
    assert "exit code 7" in str(info.value)


def test_logs_follow_streams_until_the_job_ends(target, tmp_path):
    gate = tmp_path / "gate"
    job = target.submit_script([
        "echo started",
        f"i=0; while [ ! -e {gate} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
        "echo finished",
    ])
    wait_until(lambda: "started" in job.logs(), timeout=20, what="job output")
    gate.touch()
    stream = io.StringIO()
    text = job.logs(follow=True, stream=stream)
    assert "started" in text and "finished" in text
    assert "finished" in stream.getvalue()
    assert job.job_status == "complete"


def test_missing_script_is_an_error_before_anything_is_started(target, tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        target.submit_script(tmp_path / "nope.sh")
    assert target.job_statuses() == {}


def test_missing_input_file_is_an_error_before_anything_is_copied(target, tmp_path):
    with pytest.raises(JobError, match="missing.csv does not exist"):
        target.submit_script(["true"], files=[tmp_path / "missing.csv"])
    assert target.job_statuses() == {}


def test_script_of_the_wrong_type_is_refused(target):
    with pytest.raises(JobError, match="script must be"):
        target.submit_script(42)
    with pytest.raises(JobError, match="on_complete"):
        target.submit_script(["true"], on_complete="reboot")


def test_jobs_are_found_again_from_a_new_server_object(target, tmp_path):
    job = target.submit_script(["echo kept on the server"], job_name="findme")
    _wait_final(job)
    again = (crimpl.Local(root=tmp_path / "local") if target.instanceId == "local"
             else crimpl.load_server("jobs-test") if target.instanceId is None
             else crimpl.AWSEC2(target.instanceId))
    found = again.get_job("findme")
    assert found.job_status == "complete"
    assert "kept on the server" in found.logs()
    assert [j.job_name for j in again.jobs] == ["findme"]
    assert again.get_job().job_name == "findme"
    with pytest.raises(JobError, match="jobs: findme"):
        again.get_job("other")


def test_a_job_never_submitted_reads_not_submitted(target):
    assert crimpl.Job(target, "never-sent").job_status == "not-submitted"
    assert target.job_status == "not-submitted"


def test_submitting_while_a_job_runs_is_refused_unless_allowed(target, tmp_path):
    gate = tmp_path / "gate"
    first = target.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"])
    try:
        with pytest.raises(JobError, match=f"another job is running on .*: {first.job_name}; "):
            target.submit_script(["true"])
        second = target.submit_script(["echo alongside"], allow_concurrent=True)
        assert _wait_final(second).state == "complete"
    finally:
        gate.touch()
    assert _wait_final(first).state == "complete"


def test_a_job_name_is_not_reused(target):
    _wait_final(target.submit_script(["true"], job_name="once"))
    with pytest.raises(JobError, match="already exists"):
        target.submit_script(["true"], job_name="once")


# -- kill, resubmit --------------------------------------------------------------------


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_ends_the_whole_process_group(target):
    job = target.submit_script([
        "sleep 300 &", "echo $! > pids", "sh -c 'echo $$ >> pids; exec sleep 301' &", "wait",
    ])
    # Both targets keep their jobs on this machine (the test sshd runs here too).
    pids_path = Path(job.job_dir) / "pids"

    def read():
        return pids_path.read_text() if pids_path.exists() else ""

    wait_until(lambda: len(read().split()) == 2, timeout=20, what="job children started")
    pids = [int(p) for p in read().split()]
    assert job.kill() is True
    status = _wait_final(job)
    assert status.state == "killed"
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=20, what="children gone")
    assert job.kill() is False


def test_resubmit_reruns_a_finished_job_in_place(target, tmp_path):
    counter = tmp_path / "count.txt"
    counter.write_text("one\n")
    job = target.submit_script(["cat count.txt >> seen.txt", "cat seen.txt"], files=[counter])
    _wait_final(job)
    counter.write_text("two\n")
    job.resubmit()
    status = _wait_final(job)
    assert status.state == "complete"
    assert job.logs() == "one\ntwo\n"


def test_resubmitting_a_running_job_is_refused(target, tmp_path):
    gate = tmp_path / "gate"
    job = target.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"])
    try:
        with pytest.raises(JobError, match="still running"):
            job.resubmit()
    finally:
        gate.touch()
    _wait_final(job)


# -- outputs -----------------------------------------------------------------------------


def test_missing_output_is_an_error_listing_the_job_directory(target):
    job = target.submit_script(["echo x > present.txt"])
    _wait_final(job)
    with pytest.raises(crimpl.TransferError, match="present.txt"):
        job.check_output("absent.txt", ".")


def test_check_output_uses_the_latest_job_and_reports_replaced_files(target, tmp_path):
    _wait_final(target.submit_script(["echo old > result.txt"]))
    _wait_final(target.submit_script(["echo new > result.txt"]))
    dest = tmp_path / "result.txt"
    dest.write_text("local edit\n")
    report = target.check_output("result.txt", str(dest))
    assert dest.read_text() == "new\n"
    assert [Path(p).name for p in report.replaced] == ["result.txt"]


# -- detachment ------------------------------------------------------------------------


def test_a_detached_job_survives_its_client_being_killed(target, tmp_path):
    gate = tmp_path / "gate"
    if target.instanceId == "local":
        make = f"crimpl.Local(root={str(tmp_path / 'local')!r})"
    elif target.instanceId is None:
        make = "crimpl.load_server('jobs-test')"
    else:
        make = f"crimpl.AWSEC2({target.instanceId!r})"  # finds the only saved config
    client = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, crimpl
            job = {make}.submit_script(
                ["while [ ! -e {gate} ]; do sleep 0.1; done", "echo survived"], job_name="orphan")
            print("submitted", flush=True)
            sys.stdin.read()  # stay alive until killed
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    assert client.stdout.readline().strip() == "submitted"
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    job = target.get_job("orphan")
    assert job.job_status == "running"
    gate.touch()
    assert _wait_final(job).state == "complete"
    assert "survived" in job.logs()


def test_local_target_refuses_on_complete(tmp_path):
    with pytest.raises(JobError, match="on_complete needs an EC2 server"):
        crimpl.Local(root=tmp_path / "l").submit_script(["true"], on_complete="stop")


# -- EC2 only: starting a stopped instance, unreachable state, on_complete ---------------


def test_submit_starts_a_stopped_instance_first_and_says_so(ec2_server, caplog):
    ec2_server.stop()
    caplog.set_level("INFO", logger="crimpl")
    job = ec2_server.submit_script(["echo up again"])
    assert ec2_server.state == "running"
    assert any("starting it" in r.getMessage() for r in caplog.records)
    assert _wait_final(job).state == "complete"


def test_job_status_is_unknown_while_the_instance_is_stopped(ec2_server):
    job = ec2_server.submit_script(["true"])
    _wait_final(job)
    ec2_server.stop()
    assert job.job_status == "unknown"
    assert ec2_server.job_status == "unknown"


def _recording_shutdown(tmp_path, instance_id, endpoint):
    """A shutdown command that records its call and asks the EC2 endpoint to act on this instance.

    It stands in for `sudo shutdown -h now` and does what EC2 does on an
    instance-initiated shutdown: stop or terminate, as the instance's
    InstanceInitiatedShutdownBehavior says.
    """
    record = tmp_path / "shutdown-record.json"
    script = tmp_path / "fake-shutdown.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, boto3
        status = open("crimpl-status").read()
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url={endpoint!r},
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        behavior = ec2.describe_instance_attribute(
            InstanceId={instance_id!r}, Attribute="instanceInitiatedShutdownBehavior",
        )["InstanceInitiatedShutdownBehavior"]["Value"]
        json.dump({{"status_at_call": json.loads(status), "behavior": behavior}}, open({str(record)!r}, "w"))
        if behavior == "terminate":
            ec2.terminate_instances(InstanceIds=[{instance_id!r}])
        else:
            ec2.stop_instances(InstanceIds=[{instance_id!r}])
    """))
    return f"{sys.executable} {script}", record


@pytest.mark.parametrize("on_complete, final_state", [("stop", "stopped"), ("terminate", "terminated")])
def test_on_complete_shuts_down_only_after_the_script_ended(
        aws, key_file, login_user, serve_instance, tmp_path, on_complete, final_state):
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
                                  remote_dir=str(tmp_path / "remote"), ssh_timeout=20)
    server = crimpl.AWSEC2.new(config, nprocs=2, server_name=f"oc-{on_complete}")
    command, record = _recording_shutdown(tmp_path, server.instanceId, aws.url)
    server._config = crimpl.AWSEC2_Config(**{**config.to_dict(), "shutdown_command": command})
    serve_instance(server.instanceId)
    job = server.submit_script(["echo working", "exit 4"], on_complete=on_complete)
    wait_until(lambda: server.state == final_state, timeout=30, what=f"instance {final_state}")
    recorded = json.loads(record.read_text())
    assert recorded["behavior"] == on_complete
    assert recorded["status_at_call"]["state"] == "failed"
    assert recorded["status_at_call"]["exit_code"] == 4
    assert recorded["status_at_call"]["ended"]
    assert "-commands-" in job.job_name


def test_without_on_complete_the_shutdown_command_never_runs(ec2_server, tmp_path, aws):
    command, record = _recording_shutdown(tmp_path, ec2_server.instanceId, aws.url)
    ec2_server._config = crimpl.AWSEC2_Config(**{**ec2_server.config.to_dict(), "shutdown_command": command})
    job = ec2_server.submit_script(["true"])
    status = _wait_final(job)
    assert status.state == "complete"
    wrapper_pid = json.loads((Path(job.job_dir) / "crimpl-status").read_text())["pid"]
    wait_until(lambda: not _alive(wrapper_pid), timeout=20, what="wrapper exit")
    assert not record.exists()
    assert ec2_server.state == "running"
    ec2 = boto3.client("ec2")
    attr = ec2.describe_instance_attribute(InstanceId=ec2_server.instanceId,
                                           Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"


# == under faults ==========================================================================


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _stat(pid):
    """Fields 3.. of /proc/PID/stat (after the command name), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root):
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        kids = [p for p in _pids() if (_stat(p) or [None, None])[1] == str(parent)]
        found += kids
        frontier += kids
    return found


def _cut_ssh_connections(sshd):
    """Kill the sshd processes of every open connection; the listener stays up."""
    for pid in _descendants(sshd.process.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("sshd"):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(params=TARGETS)
def cut_target(request, tmp_path):
    """A target and a function that cuts its open connections (nothing to cut locally)."""
    if request.param == "local":
        return crimpl.Local(root=tmp_path / "local"), lambda: None
    if request.param == "sshhost":
        server = _ssh_host_server(request, tmp_path)
        return server, lambda: _cut_ssh_connections(request.getfixturevalue("ssh_host").sshd)
    server, sshd = request.getfixturevalue("ec2_sshd")
    return server, lambda: _cut_ssh_connections(sshd)


def _gate_loop(gate):
    return f"while [ ! -e {gate} ]; do sleep 0.1; done"


# -- names and paths (8.5, 8.7, 8.12) ------------------------------------------------------


RESERVED_SCRIPT_NAMES = ["crimpl-log", "crimpl-status", "crimpl-killed", "crimpl-job.sh",
                         "crimpl-script.sh", "-x.sh", ".crimpl-manifest"]


def test_scripts_named_like_crimpl_files_are_refused_before_anything_runs(target, tmp_path):
    for name in RESERVED_SCRIPT_NAMES:
        script = tmp_path / "scripts" / name
        script.parent.mkdir(exist_ok=True)
        script.write_text("echo ran\n")
        with pytest.raises(JobError, match="rename it") as info:
            target.submit_script(script)
        assert repr(name) in str(info.value)
        assert "\n" not in str(info.value)
    assert target.job_statuses() == {}


def test_inputs_named_like_crimpl_files_are_refused_even_as_symlinks(target, tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("data\n")
    (tmp_path / "links").mkdir()
    for name in ["crimpl-log", "crimpl-status", "crimpl-killed", "crimpl-job.sh", ".crimpl-x"]:
        link = tmp_path / "links" / name
        link.symlink_to(real)
        with pytest.raises(JobError, match=f"would land as '{name}'"):
            target.submit_script(["cat real.txt"], files=[link])
    # A link named like the script lands on the script.
    script = tmp_path / "run.sh"
    script.write_text("echo ran\n")
    (tmp_path / "links" / "run.sh").symlink_to(real)
    with pytest.raises(JobError, match="would land as 'run.sh'"):
        target.submit_script(script, files=[tmp_path / "links" / "run.sh"])
    assert target.job_statuses() == {}


@pytest.mark.parametrize("files", ["", "   ", [""], ["data.txt", " "], 5, [5], b"data.txt", [None]],
                         ids=["empty", "blank", "empty-in-list", "blank-in-list", "int", "int-in-list",
                              "bytes", "none-in-list"])
def test_unusable_input_paths_are_refused_in_one_line(tmp_path, monkeypatch, files):
    # An empty path must not mean the current folder, which would then be uploaded whole.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x\n")
    local = crimpl.Local(root=tmp_path / "local")
    with pytest.raises(JobError) as info:
        local.submit_script(["true"], files=files)
    assert "\n" not in str(info.value)
    assert local.job_statuses() == {}


def test_empty_script_job_name_and_output_paths_are_refused_in_one_line(tmp_path):
    local = crimpl.Local(root=tmp_path / "local")
    with pytest.raises(JobError, match="empty path"):
        local.submit_script("")
    with pytest.raises(JobError, match="job name ''"):
        local.submit_script(["true"], job_name="")
    job = local.submit_script(["echo x > out.txt"])
    _wait_final(job)
    for bad in (None, "", [], [None], 5):
        with pytest.raises(crimpl.TransferError, match="server_path must be") as info:
            job.check_output(bad, str(tmp_path / "out"))
        assert "\n" not in str(info.value)
    with pytest.raises(crimpl.TransferError, match="local_path must be"):
        local.check_output("out.txt", None)
    assert not (tmp_path / "out").exists()


def _write_status(target, name, text):
    directory = Path(target.job_root) / "jobs" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "crimpl-status").write_text(text)
    return directory


def test_malformed_status_records_read_unknown_with_the_reason(target):
    _wait_final(target.submit_script(["true"], job_name="good"))
    bad = {
        "not-json": "this is not json\n",
        "a-list": "[1, 2]\n",
        "text-exit-code": '{"state": "complete", "exit_code": "zero", "pid": 12, "started": '
                          '"2026-01-01T00:00:00Z", "ended": null, "on_complete": ""}\n',
        "number-started": '{"state": "failed", "exit_code": 2, "pid": 12, "started": 5, '
                          '"ended": null, "on_complete": ""}\n',
        "list-state": '{"state": ["running"], "exit_code": null, "pid": 12}\n',
        "two-lines": '{"state": "complete"}\ninjected\talive\t-\t{"state": "complete"}\n',
    }
    for name, text in bad.items():
        _write_status(target, name, text)
    statuses = target.job_statuses()
    assert statuses["good"].state == "complete"
    assert "injected" not in statuses
    for name in bad:
        assert statuses[name].state == "unknown", name
        assert "unreadable crimpl-status" in statuses[name].detail
    # Waiting on a record that cannot be read returns it: it would never change.
    assert target.get_job("number-started").wait(timeout=20, interval=0.1).state == "unknown"


# -- one running job, atomically (8.8) ----------------------------------------------------------


def test_of_two_submits_at_once_exactly_one_starts(target, tmp_path):
    gate = tmp_path / "gate"
    # An input that takes longer to send than the quick check before the upload.
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 * 2**20))
    barrier = threading.Barrier(2)
    results = [None, None]

    def submit(i):
        barrier.wait(30)
        try:
            results[i] = target.submit_script([_gate_loop(gate)], files=[data], job_name=f"twin-{i}",
                                              quiet=True)
        except JobError as exc:
            results[i] = exc

    threads = [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(r is not None for r in results), timeout=120, what="both submits")
        started = [r for r in results if isinstance(r, crimpl.Job)]
        refused = [r for r in results if isinstance(r, JobError)]
        assert len(started) == 1 and len(refused) == 1, results
        assert f"another job is running on {target}: {started[0].job_name}; " in str(refused[0])
        statuses = target.job_statuses()
        # The refused job left nothing behind, and the lock is released.
        assert {n: s.state for n, s in statuses.items()} == {started[0].job_name: "running"}
        assert not (Path(target.job_root) / "jobs" / ".crimpl-lock").exists()
    finally:
        gate.touch()
    assert _wait_final(started[0]).state == "complete"


def test_a_start_lock_left_by_a_killed_submit_is_broken(target):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = Path(target.job_root) / "jobs" / ".crimpl-lock"
    lock.mkdir(parents=True)
    (lock / "pid").write_text(f"{gone.pid}\n")
    assert _wait_final(target.submit_script(["true"])).state == "complete"
    assert not lock.exists()


def test_resubmit_is_a_server_method_and_keeps_the_one_running_job_rule(target, tmp_path):
    _wait_final(target.submit_script(["echo once"], job_name="again"))
    gate = tmp_path / "gate"
    blocker = target.submit_script([_gate_loop(gate)], job_name="blocker")
    try:
        with pytest.raises(JobError, match=f"another job is running on {target}: blocker; "):
            target.resubmit("again")
    finally:
        gate.touch()
    _wait_final(blocker)
    job = target.resubmit("again")
    assert _wait_final(job).state == "complete"
    assert job.logs() == "once\n"
    assert "crimpl-log.previous" in job.ls()
    with pytest.raises(JobError, match="no job missing"):
        target.resubmit("missing")


# -- an interrupted submit is completed by a retry (8.10) ---------------------------------------


def test_an_interrupted_submit_is_completed_by_a_retry_with_the_same_name(cut_target, tmp_path):
    target, cut = cut_target
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        handle.truncate(64 * 2**20)
    directory = Path(target.job_root) / "jobs" / "interrupted"
    submit = Background(lambda: target.submit_script(["wc -c < big.bin"], files=[big],
                                                      job_name="interrupted", quiet=True))
    temporary = wait_until(lambda: list(directory.glob(".crimpl-upload-*")), timeout=60, interval=0.002,
                           what="upload under way")
    # Freeze the receiving end mid-upload (its shell and tar name its random folder), then
    # drop the connection under it.
    frozen = []
    for pid in processes_with(temporary[0].name.encode()):
        with contextlib.suppress(ProcessLookupError):  # a short-lived command (mkdir, rm) ended
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
    assert frozen, "no process of the upload was left to freeze"
    cut()
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: submit.done, timeout=60, what="the interrupted submit to return")
    assert isinstance(submit.error, crimpl.TransferError), submit.error or submit.result
    assert "submit again with job_name='interrupted'" in str(submit.error)
    assert not (directory / "crimpl-status").exists()
    assert list(directory.glob(".crimpl-upload-*"))

    job = target.submit_script(["wc -c < big.bin"], files=[big], job_name="interrupted", quiet=True)
    assert _wait_final(job).state == "complete"
    assert job.logs().strip() == str(64 * 2**20)
    assert not list(directory.glob(".crimpl-upload-*"))
    with pytest.raises(JobError, match="already exists"):
        target.submit_script(["true"], job_name="interrupted")


# -- a recorded pid that now belongs to another process (8.15) ----------------------------------


def _boot_id():
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _record(pid, **extra):
    return json.dumps({"state": "running", "exit_code": None, "pid": pid, **extra,
                       "started": "2026-01-01T00:00:00Z", "ended": None, "on_complete": ""}) + "\n"


def test_a_job_whose_pid_now_belongs_to_another_process_is_not_running_and_not_killed(target):
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start_time = _stat(stranger.pid)[19]
        _write_status(target, "other-start", _record(stranger.pid, boot_id=_boot_id(), pid_start="1"))
        _write_status(target, "other-boot", _record(
            stranger.pid, boot_id="00000000-0000-0000-0000-000000000000", pid_start=start_time))
        for name in ("other-start", "other-boot"):
            job = target.get_job(name)
            assert job.status().state == "failed", name
            assert job.kill() is False
        assert stranger.poll() is None
        # Nothing blocks a new job either.
        assert _wait_final(target.submit_script(["true"])).state == "complete"
        # The same process with its own boot id and start time is the job's: the check can tell.
        _write_status(target, "other-start", _record(stranger.pid, boot_id=_boot_id(), pid_start=start_time))
        assert target.get_job("other-start").job_status == "running"
        # A record without them (older crimpl, no /proc) falls back to "is the pid alive".
        _write_status(target, "other-boot", _record(stranger.pid))
        assert target.get_job("other-boot").job_status == "running"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_job_records_its_boot_id_and_start_time(target):
    job = target.submit_script(["true"])
    _wait_final(job)
    record = json.loads((Path(job.job_dir) / "crimpl-status").read_text())
    assert record["boot_id"] == _boot_id()
    assert record["pid_start"].isdigit()


# -- configuration errors are not "unknown" ------------------------------------------------------


def test_a_configuration_error_is_raised_not_read_as_unknown(ec2_server):
    broken = crimpl.AWSEC2(ec2_server.instanceId, config="no-such-config", ec2_client=boto3.client("ec2"))
    job = crimpl.Job(broken, "any")
    with pytest.raises(crimpl.ConfigError):
        job.status()
    with pytest.raises(crimpl.ConfigError):
        job.wait(timeout=20, interval=0.1)
    with pytest.raises(crimpl.ConfigError):
        broken.job_status  # noqa: B018 - the property is what is tested


# -- a server that stops or goes away ends every wait (8.3, 8.9) --------------------------------


@pytest.mark.parametrize("action, words", [("stop", "the server stopped"), ("terminate", "the server went away")])
def test_wait_ends_with_the_last_state_when_the_server_goes_away(ec2_server, tmp_path, action, words):
    gate = tmp_path / "gate"
    job = ec2_server.submit_script([_gate_loop(gate)])
    try:
        assert job.status().state == "running"
        ec2 = boto3.client("ec2")
        getattr(ec2, f"{action}_instances")(InstanceIds=[ec2_server.instanceId])  # out of band
        waited = Background(lambda: job.wait(interval=0.1))
        wait_until(lambda: waited.done, timeout=60, what="wait to return")
        assert isinstance(waited.error, JobUnreachableError), waited.result
        assert words in str(waited.error)
        assert "last state was running" in str(waited.error)
        assert waited.error.last_status.state == "running"
    finally:
        gate.touch()


def test_wait_gives_up_after_repeated_unreachable_polls_naming_the_last_state(ec2_sshd, tmp_path):
    server, sshd = ec2_sshd
    gate = tmp_path / "gate"
    job = server.submit_script([_gate_loop(gate)])
    try:
        assert job.status().state == "running"
        # EC2 says running, but SSH no longer answers; a short readiness timeout keeps this quick.
        server._config = crimpl.AWSEC2_Config(**{**server.config.to_dict(), "ssh_timeout": 1})
        _cut_ssh_connections(sshd)
        sshd.stop()
        assert job.job_status == "unknown"
        waited = Background(lambda: job.wait(interval=0.1, max_unreachable=2))
        wait_until(lambda: waited.done, timeout=60, what="wait to return")
    finally:
        gate.touch()
    assert isinstance(waited.error, JobUnreachableError), waited.result
    assert "did not answer 2 time(s) in a row" in str(waited.error)
    assert "last state was running" in str(waited.error)


def _follow(job):
    out = io.StringIO()
    return out, Background(lambda: job.logs(follow=True, stream=out))


def test_follow_resumes_after_a_dropped_connection_without_losing_or_repeating_output(ec2_sshd, tmp_path):
    server, sshd = ec2_sshd
    gate = tmp_path / "gate"
    job = server.submit_script(["echo part one", _gate_loop(gate), "echo part two"])
    out, follow = _follow(job)
    try:
        wait_until(lambda: "part one" in out.getvalue(), timeout=30, what="first output")
        _cut_ssh_connections(sshd)
    finally:
        gate.touch()
    wait_until(lambda: follow.done, timeout=60, what="follow to return")
    assert follow.error is None
    assert follow.result == out.getvalue() == "part one\npart two\n"
    assert job.job_status == "complete"


def test_follow_says_the_stream_was_cut_when_the_server_does_not_answer_again(ec2_sshd, tmp_path):
    server, sshd = ec2_sshd
    gate = tmp_path / "gate"
    job = server.submit_script(["echo part one", _gate_loop(gate), "echo part two"])
    out = io.StringIO()
    follow = Background(lambda: job.logs(follow=True, stream=out, max_unreachable=1))
    try:
        wait_until(lambda: "part one" in out.getvalue(), timeout=30, what="first output")
        _cut_ssh_connections(sshd)
        sshd.stop()
        wait_until(lambda: follow.done, timeout=60, what="follow to return")
    finally:
        gate.touch()
    assert isinstance(follow.error, JobUnreachableError), follow.result
    assert "was cut" in str(follow.error) and "last state was running" in str(follow.error)
    assert out.getvalue() == "part one\n"


def test_follow_ends_when_the_server_stops_under_it(ec2_sshd, tmp_path):
    server, sshd = ec2_sshd
    gate = tmp_path / "gate"
    job = server.submit_script(["echo part one", _gate_loop(gate)])
    out, follow = _follow(job)
    try:
        wait_until(lambda: "part one" in out.getvalue(), timeout=30, what="first output")
        boto3.client("ec2").stop_instances(InstanceIds=[server.instanceId])
        # A stopped instance takes its sshd and connections with it.
        _cut_ssh_connections(sshd)
        sshd.stop()
        wait_until(lambda: follow.done, timeout=60, what="follow to return")
    finally:
        gate.touch()
    assert isinstance(follow.error, JobUnreachableError), follow.result
    assert "the server stopped" in str(follow.error)
    assert "last state was running" in str(follow.error)


def test_follow_then_wait_report_the_final_state_after_on_complete_stop(
        aws, key_file, login_user, serve_instance, tmp_path):
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
                                  remote_dir=str(tmp_path / "remote"), ssh_timeout=20)
    server = crimpl.AWSEC2.new(config, nprocs=2, server_name="oc-follow")
    command, _record_file = _recording_shutdown(tmp_path, server.instanceId, aws.url)
    server._config = crimpl.AWSEC2_Config(**{**config.to_dict(), "shutdown_command": command})
    serve_instance(server.instanceId)
    gate = tmp_path / "gate"
    # As `submit --on-complete stop` then `logs --follow` do.
    job = server.submit_script(["echo working", _gate_loop(gate), "exit 4"], on_complete="stop")
    out, follow = _follow(job)
    try:
        wait_until(lambda: "working" in out.getvalue(), timeout=30, what="first output")
    finally:
        gate.touch()
    wait_until(lambda: follow.done, timeout=60, what="follow to return")
    assert follow.error is None and follow.result == "working\n"
    waited = Background(lambda: job.wait(interval=0.1))
    wait_until(lambda: waited.done, timeout=60, what="wait to return")
    assert server.state == "stopped"
    assert waited.error is None
    assert (waited.result.state, waited.result.exit_code) == ("failed", 4)
    # A new object has read nothing before the stop: it says so instead of waiting forever.
    with pytest.raises(JobUnreachableError, match="the server stopped .*last state was not read yet"):
        crimpl.Job(server, job.job_name).wait(interval=0.1)


# -- Ctrl-C is never lost ----------------------------------------------------------------------


def test_ctrl_c_during_a_job_command_is_raised_once_the_command_returned(tmp_path):
    """invoke's runner swallows KeyboardInterrupt; crimpl's job commands must not."""
    from invoke import Context

    from crimpl.jobs import protocol

    started, go = tmp_path / "started", tmp_path / "go"
    command = (f"touch {started}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; "
               "i=$((i+1)); done")

    def interrupt_then_release():
        wait_until(started.exists, timeout=30, what="the command to start")
        os.kill(os.getpid(), signal.SIGINT)
        go.touch()

    helper = threading.Thread(target=interrupt_then_release)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            protocol.run(Context(), command)
    finally:
        go.touch()
        helper.join(30)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
