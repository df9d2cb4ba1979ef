"""Spot preemption: the watchdog asks a fake metadata service (IMDSv2) on loopback for the
spot notice, marks the running job preempted and sends it SIGTERM; the client retries it.

The instance is a sandbox instance as in test_watchdog.py (moto_server plus its own sshd);
"AWS stopping the instance at the notice" is the test stopping it in moto, after which the
metadata service answers 404 again, as it does after a start.
"""

import http.server
import json
import os
import signal
import textwrap
import threading

import boto3
import pytest
from sandbox import LoopbackHTTPServer, Sshd, instance_addresses, instance_host_key, wait_until

import crimpl
from crimpl.errors import JobError
from crimpl.home import crimpl_home
from crimpl.jobs import preemption
from crimpl.jobs.protocol import PREEMPTED, STATUS


class FakeIMDS(LoopbackHTTPServer):
    """IMDSv2's token and ``spot/instance-action`` paths: 404 until :attr:`notice` is set."""

    def __init__(self):
        self.notice = None
        self.questions = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - http.server's naming
                if self.path != "/latest/api/token" or not self.headers.get(
                        "X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400, b"")
                self._answer(200, b"token-1")

            def do_GET(self):  # noqa: N802
                if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                    return self._answer(401, b"")
                if self.path != "/latest/meta-data/spot/instance-action":
                    return self._answer(404, b"")
                fake.questions += 1
                if fake.notice is None:
                    return self._answer(404, b"Not Found")
                self._answer(200, json.dumps(fake.notice).encode())

            def _answer(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


@pytest.fixture(autouse=True)
def end_left_jobs(tmp_path):
    """After each test, end the jobs its instances still run: moto terminating an instance does
    not end the processes its sshd started here. Only a job of this test's folders, by its id."""
    yield
    for status in tmp_path.glob("home-*/crimpl/jobs/*/" + STATUS):
        try:
            pid = json.loads(status.read_text())["pid"]
            if os.path.realpath(f"/proc/{pid}/cwd") == str(status.parent.resolve()):
                os.killpg(pid, signal.SIGTERM)  # the wrapper leads the job's process group
        except (OSError, ValueError, KeyError, TypeError):
            continue  # ended already


@pytest.fixture
def imds():
    fake = FakeIMDS()
    yield fake
    fake.stop()


#: The watchdog's look interval in these tests, in seconds.
TICK = 0.2

NOTICE = {"action": "stop", "time": "2026-11-30T10:00:00Z"}


def _spot_instance(instance, imds):
    inst = instance(spot=True)
    assert inst.server.spot
    inst.server.set_autostop(None, tick=TICK, imds_url=imds.url, spot_tick=TICK)
    wait_until(lambda: imds.questions >= 2, timeout=30, what="the watchdog asking the metadata service")
    return inst


def _record(inst, job):
    try:
        return json.loads((inst.home / "crimpl" / "jobs" / job.job_name / STATUS).read_text())
    except (OSError, ValueError):
        return None


def test_a_spot_notice_preempts_the_job_and_the_retry_resumes_from_its_checkpoint(instance, imds, tmp_path):
    inst = _spot_instance(instance, imds)
    script = tmp_path / "train.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "attempt $CRIMPL_ATTEMPT, checkpoint lost: $CRIMPL_CHECKPOINT_LOST"
        if [ -e "$CRIMPL_CHECKPOINT_DIR/step" ]; then
          echo "resumed from step $(cat "$CRIMPL_CHECKPOINT_DIR/step") with $(cat data.txt)"
          exit 0
        fi
        trap 'echo 41 > "$CRIMPL_CHECKPOINT_DIR/step"; echo checkpointed; exit 143' TERM
        touch running
        while :; do sleep 0.1; done
    """))
    data = tmp_path / "data.txt"
    data.write_text("the inputs")
    job = inst.server.submit_script(script, files=[data], retry_on_preemption=1)
    job_dir = inst.home / "crimpl" / "jobs" / job.job_name
    wait_until(lambda: (job_dir / "running").exists(), timeout=30, what="the first attempt running")

    imds.notice = NOTICE
    record = wait_until(lambda: (r := _record(inst, job)) and r["state"] == "preempted" and r["ended"] and r,
                        timeout=30, what="the job recorded preempted")
    assert record["exit_code"] == 143
    assert (job_dir / "checkpoint" / "step").read_text() == "41\n"
    assert json.loads((job_dir / PREEMPTED).read_text()) == NOTICE
    assert "checkpointed" in (job_dir / "crimpl-log").read_text()

    # AWS stops the instance at the notice; after the next start there is no notice.
    imds.notice = None
    inst.server.stop()
    status = job.wait(timeout=60, interval=0.2)
    assert inst.server.state == "running"
    assert status.state == "complete", status
    log = job.logs()
    assert "attempt 2, checkpoint lost: 0" in log
    assert "resumed from step 41 with the inputs" in log
    assert "attempt 1, checkpoint lost: 0" in (job_dir / "crimpl-log.previous").read_text()


def test_a_preempted_job_is_never_complete_and_exhausted_retries_leave_it_failed(instance, imds, tmp_path):
    inst = _spot_instance(instance, imds)
    # The script ends with exit code 0 on SIGTERM: a preempted job is still not complete.
    script = tmp_path / "quits.sh"
    script.write_text("#!/bin/sh\ntrap 'exit 0' TERM\necho \"attempt $CRIMPL_ATTEMPT\"\n"
                      "while :; do sleep 0.1; done\n")
    job = inst.server.submit_script(script, retry_on_preemption=1)
    job_dir = inst.home / "crimpl" / "jobs" / job.job_name
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    imds.notice = NOTICE  # it stays: every attempt is preempted
    status = job.wait(timeout=60, interval=0.2)
    assert status.state == "failed"
    assert status.exit_code == 0
    assert status.detail == "preempted 2 times (retry_on_preemption=1)"
    assert "attempt 2" in (job_dir / "crimpl-log").read_text()
    assert inst.server.job_statuses()[job.job_name].state == "failed"


def test_a_job_without_retries_is_reported_failed_once_preempted(instance, imds):
    inst = _spot_instance(instance, imds)
    job = inst.server.submit_script(["while :; do sleep 0.1; done"])
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    imds.notice = NOTICE
    status = job.wait(timeout=60, interval=0.2)
    assert (status.state, status.detail) == ("failed", "preempted 1 time")


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_retry_count_is_refused(instance, value):
    inst = instance()
    with pytest.raises(JobError, match="retry_on_preemption must be a whole number"):
        inst.server.submit_script(["true"], retry_on_preemption=value)


def test_crimpl_submit_retry_on_preemption_records_the_attempts(instance, tmp_path):
    from cli_helper import run_cli

    inst = instance()
    script = tmp_path / "one.sh"
    script.write_text("#!/bin/sh\necho \"attempt $CRIMPL_ATTEMPT in $CRIMPL_CHECKPOINT_DIR\"\n")
    result = run_cli("submit", str(script), "--retry-on-preemption", "3", "--instance-id", inst.server.instanceId)
    assert result.code == 0, result.stderr
    job = inst.server.get_job()
    assert job.wait(timeout=60, interval=0.2).state == "complete"
    job_dir = inst.home / "crimpl" / "jobs" / job.job_name
    assert (job_dir / "crimpl-attempt").read_text() == "1 3\n"
    assert job.logs() == f"attempt 1 in {job_dir}/checkpoint\n"
    assert (job_dir / "checkpoint").is_dir()


def test_a_spot_servers_user_data_has_its_watchdog_ask_for_spot_notices(key_file):
    import yaml

    from crimpl import AWSEC2_Config, watchdog
    from crimpl.config import build_spec

    spot = build_spec(AWSEC2_Config(KeyFile=str(key_file), spot=True), nprocs=2, server_name="s")
    plain = build_spec(AWSEC2_Config(KeyFile=str(key_file)), nprocs=2, server_name="p")

    def conf(spec):
        files = {f["path"]: f["content"] for f in yaml.safe_load(spec.user_data)["write_files"]}
        return files["/home/ubuntu/crimpl/watchdog/autostop.conf"]

    assert f"SPOT=yes\nIMDS={watchdog.DEFAULT_IMDS}\nSPOT_TICK=5\n" in conf(spot)
    assert "SPOT" not in conf(plain)


# -- the spot instance is gone: relaunch on new capacity ------------------------------------


@pytest.fixture
def relaunched(aws, key_file, ssh_routes, tmp_path):
    """Serve the instance a relaunch launches, as cloud-init would on it: a thread waits for a new
    live instance of the server's name in moto and starts its sshd with the host key from its
    user data and a home of its own (the old disk is gone), once ``gate`` (an Event) is set if
    one is given. Returns ``(found, thread)``."""
    started, threads = [], []

    def watch(name, old_id, gate=None):
        found = {}
        client = boto3.client("ec2")

        def newcomer():
            reservations = client.describe_instances(Filters=[
                {"Name": "tag:crimpl:name", "Values": [name]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
            return next((i for r in reservations for i in r["Instances"] if i["InstanceId"] != old_id), None)

        def serve():
            instance = wait_until(newcomer, timeout=120, what="the relaunched instance")
            if gate is not None and not gate.wait(timeout=120):
                return
            home = tmp_path / f"home-{instance['InstanceId']}"
            sshd = Sshd(tmp_path / f"sshd-{instance['InstanceId']}",
                        instance_host_key(instance["InstanceId"], aws.environ()),
                        key_file.with_suffix(".pub").read_text(), home=home)
            started.append(sshd)
            sshd.start()
            for address in instance_addresses(instance["InstanceId"], aws.environ()):
                ssh_routes.add(address, sshd.port)
            found.update(instance=instance, home=home)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return found, thread

    yield watch
    for thread in threads:
        thread.join(timeout=130)
    for sshd in started:
        sshd.stop()


def _record_path(job_name, server_name="wd"):
    return crimpl_home() / preemption.RECORDS / server_name / f"{job_name}.json"


def _described(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def _lifecycle(ec2, instance_id):
    return _described(ec2, instance_id).get("InstanceLifecycle", "on-demand")


RELAUNCHED_SCRIPT = textwrap.dedent("""\
    #!/bin/sh
    echo "attempt $CRIMPL_ATTEMPT, checkpoint lost: $CRIMPL_CHECKPOINT_LOST"
    if [ "$CRIMPL_ATTEMPT" -gt 1 ]; then
      echo "checkpoint holds: [$(ls -A "$CRIMPL_CHECKPOINT_DIR")]"
      echo "inputs: $(cat data.txt)"
      exit 0
    fi
    trap 'echo 41 > "$CRIMPL_CHECKPOINT_DIR/step"; exit 143' TERM
    touch running
    while :; do sleep 0.1; done
""")


def _preempted_and_reclaimed(inst, imds, relaunched, ec2, tmp_path, **submit):
    """Submit :data:`RELAUNCHED_SCRIPT` with one input and a retry to ``inst`` (a spot server),
    let the notice preempt it, then have EC2 reclaim the instance, as it does with interruption
    behaviour terminate. Returns ``(job, data, found, thread)`` (``relaunched``'s watch)."""
    old_id = inst.server.instanceId
    script = tmp_path / "train.sh"
    script.write_text(RELAUNCHED_SCRIPT)
    data = tmp_path / "data.txt"
    data.write_text("the inputs")
    job = inst.server.submit_script(script, files=[data], retry_on_preemption=1, **submit)
    wait_until(lambda: (inst.home / "crimpl" / "jobs" / job.job_name / "running").exists(), timeout=30,
               what="the first attempt running")
    imds.notice = {"action": "terminate", "time": "2026-11-30T10:00:00Z"}
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "preempted", timeout=30,
               what="the job recorded preempted")
    found, thread = relaunched("wd", old_id)
    ec2.terminate_instances(InstanceIds=[old_id])  # EC2 reclaims the instance, its disk with it
    return job, data, found, thread


@pytest.mark.parametrize("fallback_on_demand, lifecycle", [(False, "spot"), (True, "on-demand")])
def test_a_spot_server_terminated_at_the_notice_is_relaunched_and_the_job_completes_there(
        instance, imds, relaunched, ec2, tmp_path, fallback_on_demand, lifecycle):
    inst = _spot_instance(instance, imds)
    old_id = inst.server.instanceId
    job, data, found, thread = _preempted_and_reclaimed(inst, imds, relaunched, ec2, tmp_path,
                                                        fallback_on_demand=fallback_on_demand)
    record = _record_path(job.job_name)
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    assert json.loads(record.read_text())["files"] == [str(data)]

    status = job.wait(timeout=120, interval=0.2)
    thread.join(timeout=30)
    assert status.state == "complete", status
    assert inst.server.instanceId == found["instance"]["InstanceId"] != old_id
    assert _lifecycle(ec2, inst.server.instanceId) == lifecycle
    assert inst.server.state == "running"
    assert job.logs() == "attempt 2, checkpoint lost: 1\ncheckpoint holds: []\ninputs: the inputs\n"
    new_dir = found["home"] / "crimpl" / "jobs" / job.job_name
    assert (new_dir / "crimpl-attempt").read_text() == "2 1 lost\n"
    assert not record.exists()  # read complete: it is never relaunched again
    # Attached by name, as `crimpl` does, the server is the new instance.
    assert crimpl.AWSEC2(server_name="wd", config=inst.server.config).instanceId == inst.server.instanceId


def test_crimpl_logs_in_a_new_process_relaunches_a_spot_server_a_preemption_took(
        instance, imds, relaunched, ec2, tmp_path):
    from cli_helper import run_cli

    inst = _spot_instance(instance, imds)
    old_id = inst.server.instanceId
    job, _data, found, thread = _preempted_and_reclaimed(inst, imds, relaunched, ec2, tmp_path)
    # No live instance has the name any more: the closed laptop's next look, by name.
    wait_until(lambda: _described(ec2, old_id)["State"]["Name"] == "terminated", timeout=30,
               what="the old instance gone")

    result = run_cli("logs", job.job_name, "--follow", "--server", "wd")
    thread.join(timeout=30)
    assert result.code == 0, result.stderr
    assert result.stdout == "attempt 2, checkpoint lost: 1\ncheckpoint holds: []\ninputs: the inputs\n"
    assert "launching spot capacity for attempt 2 of 2" in result.stderr
    assert crimpl.AWSEC2(server_name="wd").instanceId == found["instance"]["InstanceId"]
    # Retried once: the record is gone once the job was read complete, and a look relaunches nothing more.
    assert not _record_path(job.job_name).exists()


def test_retries_spent_on_relaunched_capacity_leave_the_job_failed_preempted(instance, relaunched, ec2, tmp_path):
    inst = instance(spot=True)
    old_id = inst.server.instanceId
    job = inst.server.submit_script(["echo \"attempt $CRIMPL_ATTEMPT\"", "while :; do sleep 0.1; done"],
                                    retry_on_preemption=1)
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    found, thread = relaunched("wd", old_id)
    ec2.terminate_instances(InstanceIds=[old_id])
    result = {}
    waiter = threading.Thread(target=lambda: result.update(status=job.wait(timeout=120, interval=0.2)))
    waiter.start()
    thread.join(timeout=130)
    new_status = lambda: found["home"] / "crimpl" / "jobs" / job.job_name / STATUS  # noqa: E731
    wait_until(lambda: new_status().exists() and json.loads(new_status().read_text())["state"] == "running",
               timeout=60, what="the second attempt running on the relaunched server")
    ec2.terminate_instances(InstanceIds=[found["instance"]["InstanceId"]])  # preempted again
    waiter.join(timeout=130)
    status = result["status"]
    assert (status.state, status.detail) == ("failed", "preempted 2 times (retry_on_preemption=1)")
    assert len(ec2.describe_instances(Filters=[{"Name": "tag:crimpl:name", "Values": ["wd"]}])
               ["Reservations"]) == 2  # no third launch


def test_a_job_the_relaunch_could_not_send_is_sent_on_the_next_look(instance, relaunched, ec2, tmp_path):
    inst = instance(spot=True)
    inst.server._config = crimpl.AWSEC2_Config(**{**inst.server.config.to_dict(), "ssh_timeout": 2})
    old_id = inst.server.instanceId
    data = tmp_path / "data.txt"
    data.write_text("the inputs")
    job = inst.server.submit_script(['if [ "$CRIMPL_ATTEMPT" = 1 ]; then while :; do sleep 0.1; done; fi',
                                     'echo "attempt $CRIMPL_ATTEMPT: $(cat data.txt)"'],
                                    files=[data], retry_on_preemption=1)
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    gate = threading.Event()
    found, thread = relaunched("wd", old_id, gate=gate)
    ec2.terminate_instances(InstanceIds=[old_id])
    with pytest.raises(JobError, match=r"was launched for it, but the job could not be sent there \(.*\): "
                                       "look at the job again to send it$") as caught:
        job.wait(timeout=60, interval=0.2)
    assert "\n" not in str(caught.value)
    assert inst.server.instanceId != old_id
    gate.set()  # its SSH is up now
    thread.join(timeout=60)
    status = job.wait(timeout=60, interval=0.2)
    assert status.state == "complete", status
    assert job.logs() == "attempt 2: the inputs\n"
    assert len(ec2.describe_instances(Filters=[{"Name": "tag:crimpl:name", "Values": ["wd"]}])
               ["Reservations"]) == 2  # sent to the capacity launched, not launched again


def test_a_relaunch_without_the_local_inputs_is_a_one_line_error_and_launches_nothing(instance, ec2, tmp_path):
    inst = instance(spot=True)
    data = tmp_path / "data.txt"
    data.write_text("the inputs")
    job = inst.server.submit_script(["while :; do sleep 0.1; done"], files=[data], retry_on_preemption=2)
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    data.unlink()
    ec2.terminate_instances(InstanceIds=[inst.server.instanceId])
    with pytest.raises(JobError) as caught:
        job.wait(timeout=60, interval=0.2)
    message = str(caught.value)
    assert "\n" not in message
    assert f"crimpl needs {data}, which is missing here: restore it and look at the job again" in message
    instances = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:crimpl:name", "Values": ["wd"]}])
                 ["Reservations"] for i in r["Instances"]]
    assert [i["State"]["Name"] for i in instances] == ["terminated"]


def test_an_on_demand_server_that_went_away_is_not_relaunched(instance, ec2, tmp_path):
    inst = instance()
    job = inst.server.submit_script(["while :; do sleep 0.1; done"], retry_on_preemption=1)
    wait_until(lambda: (_record(inst, job) or {}).get("state") == "running", timeout=30, what="the job running")
    ec2.terminate_instances(InstanceIds=[inst.server.instanceId])
    with pytest.raises(crimpl.JobUnreachableError, match="went away"):
        job.wait(timeout=60, interval=0.2)
    assert len(ec2.describe_instances(Filters=[{"Name": "tag:crimpl:name", "Values": ["wd"]}])
               ["Reservations"]) == 1


def test_crimpl_submit_fallback_on_demand_records_paths_and_options_only(instance, tmp_path):
    from cli_helper import run_cli

    inst = instance(spot=True)
    script = tmp_path / "one.sh"
    # Still running when the record is read: a job read complete has its record dropped.
    script.write_text("#!/bin/sh\nwhile :; do sleep 0.1; done\n")
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli("submit", str(script), "-f", str(data), "--retry-on-preemption", "2", "--fallback-on-demand",
                     "--instance-id", inst.server.instanceId)
    assert result.code == 0, result.stderr
    job = inst.server.get_job()
    record = json.loads(_record_path(job.job_name).read_text())
    assert record == {"server_name": "wd", "instance_id": inst.server.instanceId, "job_name": job.job_name,
                      "script": str(script), "commands": None, "files": [str(data)], "retries": 2,
                      "attempt": 1, "fallback_on_demand": True, "on_complete": None, "allow_concurrent": False}
    assert oct(_record_path(job.job_name).stat().st_mode & 0o777) == "0o600"
    inst.server.terminate()
    assert not _record_path(job.job_name).parent.exists()  # terminated on purpose: nothing to relaunch


@pytest.mark.parametrize("kwargs, message", [
    ({"fallback_on_demand": True}, "fallback_on_demand needs retry_on_preemption"),
    ({"fallback_on_demand": "yes", "retry_on_preemption": 1}, "fallback_on_demand must be True or False"),
])
def test_a_fallback_without_retries_or_not_a_flag_is_refused(tmp_path, kwargs, message):
    with pytest.raises(JobError, match=message):
        crimpl.Local(tmp_path / "local").submit_script(["true"], **kwargs)
    assert not (tmp_path / "local" / "jobs").exists() or not any((tmp_path / "local" / "jobs").iterdir())
