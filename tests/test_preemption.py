"""Spot preemption: the watchdog asks a fake metadata service (IMDSv2) on loopback for the
spot notice, marks the running job preempted and sends it SIGTERM; the client retries it.

The instance is a sandbox instance as in test_watchdog.py (moto_server plus its own sshd);
"AWS stopping the instance at the notice" is the test stopping it in moto, after which the
metadata service answers 404 again, as it does after a start.
"""

import http.server
import json
import textwrap

import pytest
from sandbox import LoopbackHTTPServer, wait_until
from test_watchdog import TICK, instance  # noqa: F401 - the fixture, shared

from crimpl.errors import JobError
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


@pytest.fixture
def imds():
    fake = FakeIMDS()
    yield fake
    fake.stop()


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
        echo "attempt $CRIMPL_ATTEMPT"
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
    assert "attempt 2" in log
    assert "resumed from step 41 with the inputs" in log
    assert "attempt 1" in (job_dir / "crimpl-log.previous").read_text()


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
