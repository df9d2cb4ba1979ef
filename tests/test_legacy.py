"""The old crimpl's names (crimpl/jobs/legacy.py): a script written for the old crimpl runs
unchanged, as a process of its own, against an SSH host and a real Slurm through its login node.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import crimpl
from crimpl.errors import JobError

REPO = Path(__file__).resolve().parent.parent

#: Written as the old crimpl's users (PHOEBE's remote computations) write it.
OLD_STYLE_SCRIPT = textwrap.dedent("""\
    import json, sys
    import crimpl

    kind, host, directory = sys.argv[1:4]
    cls = crimpl.RemoteSlurmServer if kind == "slurm" else crimpl.RemoteThreadServer
    s = cls(host=host, directory=directory)
    s.save("legacy-server", overwrite=True)
    s = crimpl.load_server("legacy-server")
    seen = {"servers": crimpl.list_servers(), "kind": type(s).__name__}

    job = s.create_job(job_name="sum", nprocs=1)
    seen["before_submit"] = job.job_status
    job.submit_script("sum.sh", files=["numbers.txt"])
    seen["waited"] = job.wait_for_job_status("complete", sleeptime=0.2)
    job.check_output("result.txt", "out/")
    seen["existing"] = s.existing_jobs

    long = s.submit_job(["echo started", "sleep 120"], job_name="long", nprocs=1)
    long.wait_for_job_status("running", sleeptime=0.2)
    long.kill_job()
    seen["killed"] = long.wait_for_job_status(["killed", "canceled"], sleeptime=0.2)

    job.resubmit_script()
    seen["resubmitted"] = job.wait_for_job_status(sleeptime=0.2)
    seen["statuses"] = s.existing_jobs_status
    print(json.dumps(seen))
""")


@pytest.fixture(params=["ssh", "slurm"])
def old_user(request, tmp_path):
    """``(kind, host alias, remote directory, work folder)`` for an old-style script."""
    host = request.getfixturevalue("ssh_host" if request.param == "ssh" else "slurm_host")
    work = tmp_path / "work"
    work.mkdir()
    (work / "numbers.txt").write_text("4\n5\n")
    (work / "sum.sh").write_text("#!/bin/sh\nawk '{s+=$1} END {print s}' numbers.txt > result.txt\n"
                                 "echo \"run $(ls crimpl-log* | wc -l)\"\n")
    (work / "old_script.py").write_text(OLD_STYLE_SCRIPT)
    return request.param, host.alias, str(tmp_path / "remote"), work


def test_a_script_written_for_the_old_crimpl_runs_unchanged(old_user):
    kind, alias, directory, work = old_user
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "old_script.py", kind, alias, directory], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["servers"] == ["legacy-server"]
    assert seen["kind"] == ("RemoteSlurmServer" if kind == "slurm" else "RemoteThreadServer")
    assert seen["before_submit"] == "not-submitted"
    assert seen["waited"] == "complete"
    assert (work / "out" / "result.txt").read_text() == "9\n"
    assert seen["existing"] == ["sum"]
    assert seen["killed"] == "killed"
    assert seen["resubmitted"] == "complete"
    assert seen["statuses"] == {"sum": "complete", "long": "killed"}
    # The second run is a run of its own, beside the first one's log.
    sum_dir = Path(directory) / "jobs" / "sum"
    assert (sum_dir / "crimpl-log.previous").read_text() == "run 1\n"
    assert (sum_dir / "crimpl-log").read_text() == "run 2\n"
    saved = crimpl_home_file("servers", "legacy-server.json")
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert json.loads(saved.read_text())["host"] == alias


def crimpl_home_file(*parts):
    return Path(os.environ["CRIMPL_HOME"]).joinpath(*parts)


@pytest.fixture
def thread_server(ssh_host, tmp_path):
    return crimpl.RemoteThreadServer(ssh_host.alias, directory=str(tmp_path / "remote"))


def test_waiting_for_a_state_a_job_that_ended_never_reaches_is_an_error_not_a_hang(thread_server):
    job = thread_server.submit_job(["true"], job_name="quick")
    assert job.wait_for_job_status("complete", sleeptime=0.1) == "complete"
    with pytest.raises(JobError, match="job quick is complete and will never be running: resubmit it"):
        job.wait_for_job_status("running", sleeptime=0.1)


def test_a_job_never_submitted_is_an_error_to_wait_for(thread_server):
    job = thread_server.create_job(job_name="idle")
    with pytest.raises(JobError, match="job idle is not-submitted and will never be complete: submit it first"):
        job.wait_for_job_status(sleeptime=0.1)


def test_a_failed_job_ends_the_wait_with_an_error_and_its_exit_code(thread_server):
    job = thread_server.submit_job(["exit 4"], job_name="bad")
    with pytest.raises(JobError, match=r"job bad is failed \(exit code 4\) \(error_if="):
        job.wait_for_job_status("complete", sleeptime=0.1)
    assert job.wait_for_job_status("failed", sleeptime=0.1) == "failed"


@pytest.mark.parametrize("call, message", [
    (lambda s: s.create_job(conda_env="default"), "conda_env is no longer part of crimpl: activate"),
    (lambda s: s.submit_job(["true"], trial_run=True), "trial_run is no longer part of crimpl"),
    (lambda s: s.submit_job(["true"], walltime="01:00:00"), "walltime needs a Slurm server"),
    (lambda s: s.submit_job(["true"], addl_slurm_kwargs={"partition": "x"}),
     "addl_slurm_kwargs needs a Slurm server"),
    (lambda s: s.create_job(colour="red"), "unknown option colour"),
    (lambda s: s.create_job(job_name="a b"), "job name"),
    (lambda s: s.create_job().wait_for_job_status("done"), "status 'done' is not a job state"),
])
def test_old_options_without_a_counterpart_are_one_line_errors(thread_server, call, message):
    with pytest.raises(JobError, match=message) as caught:
        call(thread_server)
    assert "\n" not in str(caught.value)
    assert thread_server.existing_jobs == []


def test_addl_slurm_kwargs_become_sbatch_options(slurm_host, tmp_path):
    cluster = crimpl.RemoteSlurmServer(slurm_host.alias, directory=str(tmp_path / "remote"))
    job = cluster.create_job(job_name="opts", nprocs=2)
    job.submit_script(["echo hi"], walltime="00:05:00", addl_slurm_kwargs={"comment": "from-old-crimpl"},
                      wait_for_job_status="complete")
    batch = (Path(job.job_dir) / "crimpl-sbatch.sh").read_text()
    assert "--ntasks=2" in batch and "#SBATCH --time=00:05:00" in batch
    assert "--comment=from-old-crimpl" in batch
    assert job.job_status == "complete"
