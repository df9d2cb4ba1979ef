"""A Slurm cluster as a crimpl server, against a real Slurm (tests/slurm_cluster.py) through a
real login node (an sshd on loopback whose sessions see the cluster's SLURM_CONF).

The cluster has one node with 2 CPUs; a job that takes both keeps the next one pending.
"""

import io
from pathlib import Path

import pytest

import crimpl
from crimpl.errors import HostKeyMismatchError, JobError
from crimpl.jobs import JobStatus
from crimpl.jobs.arrays import summarize
from crimpl.slurm import _array_ids, slurm_status
from sandbox import wait_until


@pytest.fixture
def cluster(slurm_host, tmp_path):
    return crimpl.RemoteSlurmServer(slurm_host.alias, directory=str(tmp_path / "remote-slurm"))


def _gate(path):
    return f"i=0; while [ ! -e {path} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"


def _final(job, timeout=60):
    return job.wait(timeout=timeout, interval=0.2)


def test_a_job_waits_pending_then_completes_and_its_outputs_come_back(cluster, tmp_path):
    gate = tmp_path / "gate"
    blocker = cluster.submit_script([_gate(gate)], nprocs=2, job_name="blocker", quiet=True)
    wait_until(lambda: blocker.job_status == "running", timeout=30, what="blocker running")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "n.txt").write_text("2\n3\n")
    job = cluster.submit_script(["mkdir -p results", "awk '{s+=$1} END {print s}' data/n.txt > results/sum.txt",
                                 "echo ran as Slurm job $SLURM_JOB_ID"],
                                files=[tmp_path / "data"], walltime="00:05:00", quiet=True)
    status = job.status()
    assert status.state == "pending", status
    slurm_id = (Path(job.job_dir) / "crimpl-slurm-id").read_text().strip()
    assert status.detail.startswith(f"Slurm job {slurm_id} pending")
    batch = (Path(job.job_dir) / "crimpl-sbatch.sh").read_text()
    assert "#SBATCH --time=00:05:00" in batch and f"#SBATCH --job-name={job.job_name}" in batch
    gate.touch()
    assert _final(blocker).state == "complete"
    final = _final(job)
    assert final.state == "complete" and final.exit_code == 0, final
    assert f"ran as Slurm job {slurm_id}" in job.logs()
    job.check_output("results/sum.txt", str(tmp_path / "out") + "/", quiet=True)
    assert (tmp_path / "out" / "sum.txt").read_text() == "5\n"
    assert list(cluster.job_statuses()) == ["blocker", job.job_name]


def test_a_non_zero_exit_is_failed_with_its_code(cluster):
    job = cluster.submit_script(["echo trying", "exit 3"], quiet=True)
    status = _final(job)
    assert status.state == "failed" and status.exit_code == 3, status
    assert status.detail == "Slurm: FAILED"


def test_nprocs_and_sbatch_options_reach_slurm(cluster):
    job = cluster.submit_script(['echo "tasks=$SLURM_NTASKS partition=$SLURM_JOB_PARTITION"'], nprocs=2,
                                slurm=["--partition=debug"], mail_type="END", mail_user="me@example.org",
                                quiet=True)
    assert _final(job).state == "complete"
    assert "tasks=2 partition=debug" in job.logs()
    assert "#SBATCH --mail-user=me@example.org" in (Path(job.job_dir) / "crimpl-sbatch.sh").read_text()


def test_an_sbatch_refusal_is_an_error_with_its_message_and_leaves_nothing(cluster):
    with pytest.raises(JobError, match=r"sbatch refused job refused-job: .*[Ii]nvalid partition") as info:
        cluster.submit_script(["true"], slurm=["--partition=nowhere"], job_name="refused-job", quiet=True)
    assert "\n" not in str(info.value)
    assert cluster.job_statuses() == {}
    assert not Path(cluster.job_root, "jobs", "refused-job").exists()
    with pytest.raises(JobError, match="sbatch refused"):
        cluster.submit_script(["true"], walltime="forever", quiet=True)


@pytest.mark.parametrize("kwargs, words", [
    ({"nprocs": 0}, "nprocs must be"),
    ({"walltime": "1 day"}, "walltime must be one word"),
    ({"slurm": ["partition=short"]}, "each slurm option must be"),
    ({"slurm": ["--comment=a\n#SBATCH --x"]}, "each slurm option must be"),
])
def test_options_that_cannot_be_sbatch_options_are_refused_before_anything_is_sent(kwargs, words):
    server = crimpl.RemoteSlurmServer("never-contacted")
    with pytest.raises(JobError, match=words):
        server.submit_script(["true"], **kwargs)


def test_kill_cancels_a_running_or_pending_job(cluster, tmp_path):
    running = cluster.submit_script(["echo started", "sleep 300"], nprocs=2, quiet=True)
    wait_until(lambda: "started" in running.logs(), timeout=30, what="job output")
    pending = cluster.submit_script(["echo never"], quiet=True)
    assert pending.job_status == "pending"
    assert pending.kill() is True
    assert running.kill() is True
    assert _final(running).state == "killed"
    assert _final(pending).state == "killed"
    assert "never" not in pending.logs()
    assert running.kill() is False


def test_logs_follow_streams_until_the_slurm_job_ends(cluster, tmp_path):
    gate = tmp_path / "gate"
    job = cluster.submit_script(["echo first", _gate(gate), "echo last"], quiet=True)
    wait_until(lambda: "first" in job.logs(), timeout=30, what="job output")
    gate.touch()
    stream = io.StringIO()
    text = job.logs(follow=True, stream=stream)
    assert text == "first\nlast\n" == stream.getvalue()
    assert job.job_status == "complete"


def test_resubmit_runs_the_job_again_as_a_new_slurm_job(cluster, tmp_path):
    counter = tmp_path / "count.txt"
    counter.write_text("one\n")
    job = cluster.submit_script(["cat count.txt >> seen.txt", "cat seen.txt"], files=[counter], quiet=True)
    assert _final(job).state == "complete"
    first_id = (Path(job.job_dir) / "crimpl-slurm-id").read_text()
    counter.write_text("two\n")
    job.resubmit(quiet=True)
    assert _final(job).state == "complete"
    assert job.logs() == "one\ntwo\n"
    assert (Path(job.job_dir) / "crimpl-slurm-id").read_text() != first_id


def test_a_job_past_its_walltime_is_failed_walltime_exceeded(cluster):
    # One minute is Slurm's smallest limit; slurmctld checks limits every 30 s.
    job = cluster.submit_script(["echo working", "sleep 600"], walltime="1", quiet=True)
    status = _final(job, timeout=180)
    assert status.state == "failed" and status.detail == "walltime exceeded", status


def test_a_job_slurm_forgot_without_an_end_record_is_failed_with_the_reason(cluster):
    job = cluster.submit_script(["true"], job_name="forgotten", quiet=True)
    assert _final(job).state == "complete"
    # As after slurmctld dropped it (MinJobAge) and its node died before the wrapper wrote the end.
    directory = Path(job.job_dir)
    (directory / "crimpl-slurm-id").write_text("999999\n")
    (directory / "crimpl-status").unlink()
    status = job.status()
    assert status.state == "failed" and status.detail == "Slurm no longer knows job 999999 and it recorded no end"


def test_an_unknown_login_node_key_is_refused(slurm_host, tmp_path):
    slurm_host.trust("")
    server = crimpl.RemoteSlurmServer(slurm_host.alias, directory=str(tmp_path / "remote-slurm"))
    with pytest.raises(HostKeyMismatchError, match="ssh-keyscan"):
        server.submit_script(["true"], quiet=True)
    assert not (tmp_path / "remote-slurm").exists()


def test_a_saved_slurm_server_works_from_the_crimpl_command(slurm_host, aws, tmp_path):
    from cli_helper import run_cli

    crimpl.RemoteSlurmServer(slurm_host.alias, directory=str(tmp_path / "remote-slurm")).save("hpc")
    assert type(crimpl.load_server("hpc")) is crimpl.RemoteSlurmServer
    script = tmp_path / "run.sh"
    script.write_text("echo from the cluster\n")
    assert run_cli("submit", script, "--name", "viacli", "--server", "hpc", "--quiet", cwd=tmp_path).code == 0
    followed = run_cli("logs", "viacli", "--follow", "--server", "hpc", cwd=tmp_path)
    assert followed.code == 0 and "from the cluster" in followed.stdout, followed
    listed = run_cli("list", cwd=tmp_path)
    assert "hpc" in listed.stdout and "slurm" in listed.stdout
    stopped = run_cli("stop", "--server", "hpc", cwd=tmp_path)
    assert stopped.code == crimpl.ExitStatus.CONFIG and "crimpl cannot stop it" in stopped.stderr


# -- Slurm's states, as crimpl reads them ------------------------------------------------------

ENDED = JobStatus("failed", exit_code=137, started="s", ended="e")
DONE = JobStatus("complete", exit_code=0, started="s", ended="e")


@pytest.mark.parametrize("record, slurm, state, detail", [
    (JobStatus("not-submitted"), "PENDING", "pending", "Slurm job 7 pending (Resources)"),
    (JobStatus("not-submitted"), "CONFIGURING", "pending", "Slurm job 7 configuring (Resources)"),
    (ENDED, "RUNNING", "running", ""),
    (ENDED, "COMPLETING", "running", ""),
    (DONE, "COMPLETED", "complete", ""),
    (ENDED, "COMPLETED", "failed", "Slurm job 7 completed but crimpl-status says failed (exit code 137)"),
    (ENDED, "FAILED", "failed", "Slurm: FAILED"),
    (ENDED, "OUT_OF_MEMORY", "failed", "Slurm: OUT_OF_MEMORY (out of memory)"),
    (ENDED, "NODE_FAIL", "failed", "Slurm: NODE_FAIL (its node failed)"),
    (ENDED, "BOOT_FAIL", "failed", "Slurm: BOOT_FAIL (its node did not boot)"),
    (ENDED, "TIMEOUT", "failed", "walltime exceeded"),
    (ENDED, "CANCELLED by 0", "killed", "Slurm job 7 cancelled"),
    (DONE, None, "complete", ""),
    (JobStatus("not-submitted"), None, "failed", "Slurm no longer knows job 7 and it recorded no end"),
])
def test_slurm_states_map_to_crimpls_honestly(record, slurm, state, detail):
    status = slurm_status(record, slurm, "Resources", "7")
    assert (status.state, status.detail) == (state, detail)


def test_array_tasks_that_wait_on_one_line_are_read_as_each_task():
    assert _array_ids("123_[4-6%2]") == ["123_4", "123_5", "123_6"]
    assert _array_ids("123_[1,3]") == ["123_1", "123_3"]
    assert _array_ids("123_7") == ["123_7"] and _array_ids("124") == ["124"]


def test_an_array_task_past_its_walltime_is_named_with_the_reason():
    tasks = {0: slurm_status(DONE, "COMPLETED", job_id="7_0"),
             1: slurm_status(JobStatus("failed", started="s"), "TIMEOUT", job_id="7_1"),
             2: slurm_status(ENDED, "FAILED", job_id="7_2")}
    status = summarize(tasks)
    assert (status.state, status.detail) == ("failed", "tasks 1, 2 failed (walltime exceeded, exit 137)")
    tasks[1] = slurm_status(JobStatus("not-submitted"), "PENDING", "JobArrayTaskLimit", "7_1")
    status = summarize(tasks)
    assert (status.state, status.detail) == ("running", "2/3 done, 1 failed")
    assert tasks[1].detail == "Slurm job 7_1 pending (JobArrayTaskLimit)"
