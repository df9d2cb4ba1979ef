"""The job protocol, on an EC2 instance (moto_server + a real sshd) and on the local target.

Every behaviour test runs on both targets: the local target must pass the same
job-protocol tests as a server reached over SSH.
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pytest

import crimpl
from crimpl.errors import JobError, ScriptFailedError
from sandbox import wait_until

TARGETS = ["local", "ec2"]


@pytest.fixture
def ec2_config(aws, key_file, login_user, tmp_path):
    """A config whose instances are reached through the test sshd as the local user."""
    config = crimpl.AWSEC2_Config(
        KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
        remote_dir=str(tmp_path / "remote"), ssh_timeout=20,
        # The private IP survives stop/start in EC2 (and moto); the public one does not.
        use_private_ip=True,
    )
    config.save("test")
    return config


@pytest.fixture
def ec2_server(ec2_config, serve_instance):
    server = crimpl.AWSEC2.new(ec2_config, nprocs=2, server_name="jobs-test")
    serve_instance(server.instanceId)
    return server


@pytest.fixture(params=TARGETS)
def target(request, tmp_path):
    if request.param == "local":
        return crimpl.Local(root=tmp_path / "local")
    return request.getfixturevalue("ec2_server")


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
    assert (out / "results" / "sum.txt").read_text() == "6\n"
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
    with pytest.raises(JobError, match="still running"):
        target.submit_script(["true"])
    second = target.submit_script(["echo alongside"], allow_concurrent=True)
    assert _wait_final(second).state == "complete"
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
    with pytest.raises(JobError, match="still running"):
        job.resubmit()
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
