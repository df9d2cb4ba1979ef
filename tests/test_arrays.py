"""Job arrays on every server kind: the local target, an SSH host, a real Slurm (tests/slurm_cluster.py,
behind a real login node) and an EC2 instance (moto_server + a real sshd).

On Slurm the array is one ``sbatch --array``; elsewhere crimpl's runner starts the indexes.
Concurrency is proven from what the tasks write (a start and an end line each in one file,
appended in the order they happen), never from timing.
"""

import io
import os
from pathlib import Path

import pytest

import crimpl
from crimpl.errors import JobError
from crimpl.jobs.arrays import parse_array
from cli_helper import run_cli
from sandbox import Background, processes_with, wait_until

TARGETS = ["local", "sshhost", "slurm"]


@pytest.fixture(params=TARGETS)
def target(request, tmp_path):
    """A server of each kind, saved as ``arrays`` (but the local target) for the CLI tests."""
    if request.param == "local":
        return crimpl.Local(root=tmp_path / "local")
    if request.param == "sshhost":
        request.getfixturevalue("ssh_host")
        server = crimpl.RemoteThreadServer("workstation", directory=str(tmp_path / "remote-ssh"))
    else:
        host = request.getfixturevalue("slurm_host")
        server = crimpl.RemoteSlurmServer(host.alias, directory=str(tmp_path / "remote-slurm"))
    server.save("arrays")
    return server


def _gate(path):
    """Shell that waits (at most a minute) until ``path`` exists."""
    return f"n=0; while [ ! -e {path} ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done"


def _marked(marks, gate=None, fail=None):
    """Commands of a task that appends ``start I`` and ``end I`` to ``marks``, waiting for ``gate``
    in between and exiting ``fail[1]`` on index ``fail[0]``."""
    commands = [f'echo "start $CRIMPL_ARRAY_INDEX" >> {marks}', 'echo "index $CRIMPL_ARRAY_INDEX"']
    if gate:
        commands.append(_gate(gate))
    commands.append(f'echo "end $CRIMPL_ARRAY_INDEX" >> {marks}')
    if fail:
        commands.append(f'[ "$CRIMPL_ARRAY_INDEX" != {fail[0]} ] || exit {fail[1]}')
    return commands


def _started(marks):
    lines = marks.read_text().splitlines() if marks.exists() else []
    return [int(line.split()[1]) for line in lines if line.startswith("start")]


def _most_at_once(marks):
    """The most tasks that were between their start and end lines at one time."""
    running = most = 0
    for line in marks.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    return most


def _final(job, timeout=90):
    return job.wait(timeout=timeout, interval=0.2)


def test_an_array_runs_each_index_at_most_max_parallel_at_once_and_names_the_failed_one(target, tmp_path):
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    job = target.submit_script(_marked(marks, gate, fail=(4, 3)), array=6, max_parallel=2, quiet=True)
    # Two tasks start and hold their slots until the gate opens: no third starts meanwhile.
    wait_until(lambda: len(_started(marks)) == 2, timeout=60, what="two tasks started")
    assert job.job_status == "running"
    assert job.status().detail.startswith("0/6 done")
    gate.touch()
    status = _final(job)
    assert status.state == "failed", status
    assert status.detail == "task 4 failed (exit 3)"
    assert sorted(_started(marks)) == [0, 1, 2, 3, 4, 5]
    assert _most_at_once(marks) == 2
    tasks = job.tasks
    assert {i: t.state for i, t in tasks.items()} == {0: "complete", 1: "complete", 2: "complete",
                                                      3: "complete", 4: "failed", 5: "complete"}
    assert tasks[4].exit_code == 3
    for index in range(6):
        assert job.logs(index=index) == f"index {index}\n"


@pytest.mark.parametrize("kind", ["local", "sshhost"])
def test_without_max_parallel_an_array_runs_as_many_tasks_at_once_as_the_server_has_cpus(
        kind, request, tmp_path):
    if kind == "local":
        server = crimpl.Local(root=tmp_path / "local")
    else:
        request.getfixturevalue("ssh_host")
        server = crimpl.RemoteThreadServer("workstation", directory=str(tmp_path / "remote-ssh"))
    cpus = len(os.sched_getaffinity(0))  # what nproc says, here and on the loopback SSH host
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    job = server.submit_script(_marked(marks, gate), array=cpus + 2, quiet=True)
    wait_until(lambda: len(_started(marks)) == cpus, timeout=60, what=f"{cpus} tasks started")
    gate.touch()
    assert _final(job).state == "complete"
    assert _most_at_once(marks) == cpus and len(_started(marks)) == cpus + 2


def test_an_array_of_tasks_that_all_complete_is_complete(target, tmp_path):
    job = target.submit_script(['echo "sweep $CRIMPL_ARRAY_INDEX" > "out-$CRIMPL_ARRAY_INDEX.txt"'],
                               array="1,3,5-7", quiet=True)
    status = _final(job)
    assert (status.state, status.detail) == ("complete", "5/5 complete")
    assert sorted(job.tasks) == [1, 3, 5, 6, 7]
    job.check_output("out-*.txt", str(tmp_path / "out") + "/", quiet=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"out-{i}.txt" for i in (1, 3, 5, 6, 7)]
    assert (tmp_path / "out" / "out-6.txt").read_text() == "sweep 6\n"


def test_kill_of_one_index_ends_that_task_and_kill_ends_the_array_and_starts_no_more(target, tmp_path):
    marks = tmp_path / "marks.txt"
    job = target.submit_script(_marked(marks, tmp_path / "never"), array="0-3%2", quiet=True)
    wait_until(lambda: sorted(_started(marks)) == [0, 1], timeout=60, what="tasks 0 and 1 started")
    assert job.kill(index=1) is True
    wait_until(lambda: job.tasks[1].state == "killed", timeout=60, what="task 1 killed")
    # Its slot is free again: the next index starts; the others run on.
    wait_until(lambda: 2 in _started(marks), timeout=60, what="task 2 started")
    assert job.tasks[0].state == "running"
    assert job.kill() is True
    status = _final(job)
    assert status.state == "killed", status
    assert {i: t.state for i, t in job.tasks.items()} == {0: "killed", 1: "killed", 2: "killed", 3: "killed"}
    assert sorted(_started(marks)) == [0, 1, 2]
    assert "end" not in marks.read_text()
    assert job.kill() is False


def test_a_task_killed_before_it_started_never_runs(target, tmp_path):
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    job = target.submit_script(_marked(marks, gate), array="0-2%1", quiet=True)
    wait_until(lambda: _started(marks) == [0], timeout=60, what="task 0 started")
    assert job.kill(index=2) is True
    gate.touch()
    status = _final(job)
    assert status.state == "failed" and status.detail == "task 2 killed", status
    assert sorted(_started(marks)) == [0, 1] and _most_at_once(marks) == 1


def test_logs_of_a_task_follow_it_until_it_ends(target, tmp_path):
    gate = tmp_path / "gate"
    job = target.submit_script(['echo "first $CRIMPL_ARRAY_INDEX"', _gate(gate), 'echo "last $CRIMPL_ARRAY_INDEX"'],
                               array=2, quiet=True)
    wait_until(lambda: "first 1" in job.logs(index=1), timeout=60, what="task 1 output")
    gate.touch()
    stream = io.StringIO()
    assert job.logs(index=1, follow=True, stream=stream) == "first 1\nlast 1\n" == stream.getvalue()
    assert _final(job).state == "complete"


def test_following_a_task_that_waits_for_a_slot_streams_it_once_it_runs(target, tmp_path):
    gate = tmp_path / "gate"
    job = target.submit_script(['echo "first $CRIMPL_ARRAY_INDEX"', _gate(gate), 'echo "last $CRIMPL_ARRAY_INDEX"'],
                               array="0-1%1", quiet=True)
    wait_until(lambda: "first 0" in job.logs(index=0), timeout=60, what="task 0 output")
    assert job.tasks[1].state == "pending"
    stream = io.StringIO()
    follower = Background(lambda: job.logs(index=1, follow=True, stream=stream))
    # The follow is under way (its shell, or its tail, names the log) while task 1 still waits.
    wait_until(lambda: processes_with(b"crimpl-log.1"), timeout=30, what="the follow of task 1")
    assert job.tasks[1].state == "pending"
    gate.touch()
    wait_until(lambda: follower.done, timeout=60, what="the follow to end")
    assert follower.error is None and follower.result == "first 1\nlast 1\n" == stream.getvalue()


def test_the_log_of_an_array_needs_an_index_it_has(target):
    job = target.submit_script(["true"], array="0-2,5", job_name="sweep", quiet=True)
    with pytest.raises(JobError, match=r"job sweep is an array \(tasks 0-2,5\): pass the index"):
        job.logs()
    with pytest.raises(JobError, match=r"job sweep has no task 4: its indexes are 0-2,5"):
        job.logs(index=4)
    with pytest.raises(JobError, match=r"job sweep has no task 9"):
        job.kill(index=9)
    with pytest.raises(JobError, match=r"pass the index"):
        job.logs(follow=True)
    _final(job)
    single = target.submit_script(["true"], job_name="single", quiet=True)
    with pytest.raises(JobError, match="job single is not an array: leave out the index"):
        single.logs(index=0)


def test_resubmit_runs_every_index_again_and_keeps_the_previous_logs(target, tmp_path):
    job = target.submit_script(['echo "run $CRIMPL_ARRAY_INDEX"', "cat seen 2> /dev/null || true", "echo again > seen"],
                               array=2, max_parallel=1, quiet=True)
    assert _final(job).state == "complete"
    job.resubmit(quiet=True)
    assert _final(job).state == "complete"
    assert job.logs(index=1) == "run 1\nagain\n"
    files = job.ls()
    assert "crimpl-log.0.previous" in files and "crimpl-log.1.previous" in files


# -- specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("array, max_parallel, indexes, text", [
    (100, None, tuple(range(100)), "0-99"),
    (1, None, (0,), "0"),
    ("0-99%10", None, tuple(range(100)), "0-99%10"),
    ("1,3,5-7", None, (1, 3, 5, 6, 7), "1,3,5-7"),
    ("0-15:4", 2, (0, 4, 8, 12), "0-15:4%2"),
    ("0-9%5", 2, tuple(range(10)), "0-9%2"),
    ("7", None, (7,), "7"),
])
def test_array_specs_read_as_slurm_reads_them(array, max_parallel, indexes, text):
    spec = parse_array(array, max_parallel)
    assert spec.indexes == indexes and str(spec) == text


@pytest.mark.parametrize("array, max_parallel, words", [
    ("", None, "array is empty"),
    ("  ", None, "array is empty"),
    ("-1", None, "is not an index"),
    (-3, None, "must be a number of tasks from 1"),
    (0, None, "must be a number of tasks from 1"),
    ("7-3", None, "runs backwards: write 3-7"),
    ("0-9%0", None, "after % (tasks at a time) must be 1 or more"),
    ("0-9%", None, "after % (tasks at a time) must be 1 or more"),
    (100_001, None, "from 1 to 100000"),
    ("0-100000", None, "more than 100000 tasks"),
    ("0-5000000", None, "above the largest"),
    ("1,,2", None, "'' is not an index"),
    ("a-b", None, "'a-b' is not an index"),
    (2.5, None, "got float 2.5"),
    (True, None, "got bool True"),
    (["0-3"], None, "got list"),
    (4, 0, "max_parallel must be a whole number of tasks, 1 or more"),
    (4, "2", "max_parallel must be a whole number"),
    (None, 2, "max_parallel limits the tasks of an array: pass array= too"),
])
def test_bad_array_specs_are_one_line_errors_and_nothing_is_sent(tmp_path, array, max_parallel, words):
    local = crimpl.Local(root=tmp_path / "local")
    never = crimpl.RemoteSlurmServer("never-contacted")
    for server in (local, never):
        with pytest.raises(JobError) as info:
            server.submit_script(["true"], array=array, max_parallel=max_parallel, quiet=True)
        assert words in str(info.value) and "\n" not in str(info.value)
    assert local.job_statuses() == {}


def test_arrays_and_retries_on_preemption_or_run_script_do_not_mix(tmp_path):
    local = crimpl.Local(root=tmp_path / "local")
    with pytest.raises(JobError, match="retry_on_preemption does not apply to an array"):
        local.submit_script(["true"], array=2, retry_on_preemption=1)
    with pytest.raises(JobError, match="run_script runs one script"):
        local.run_script(["true"], array=2)
    assert local.job_statuses() == {}


def test_a_script_may_not_be_named_like_a_task_record(tmp_path):
    script = tmp_path / "crimpl-log.3"
    script.write_text("true\n")
    with pytest.raises(JobError, match="name crimpl keeps for its own files"):
        crimpl.Local(root=tmp_path / "local").submit_script(script, array=4)


# -- the crimpl command --------------------------------------------------------------------


def _where(target):
    """The options that choose ``target`` on the command line."""
    return ["--stack", "local"] if target.instanceId == "local" else ["--server", "arrays"]


def test_the_command_line_runs_an_array_and_shows_kills_and_logs_its_tasks(target, tmp_path):
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    script = tmp_path / "run.sh"
    script.write_text("\n".join(_marked(marks, gate, fail=(2, 4))) + "\n")
    where = _where(target)
    submitted = run_cli("submit", script, "--name", "sweep", "--array", "0-3", "--max-parallel", "2",
                        "--quiet", *where, cwd=tmp_path)
    assert submitted.code == 0, submitted.stderr
    assert "submitted sweep (an array of 4 tasks): " in submitted.stdout
    assert f"crimpl logs --job sweep --index 0 --follow {' '.join(where)}" in submitted.stdout
    wait_until(lambda: sorted(_started(marks)) == [0, 1], timeout=60, what="tasks 0 and 1 started")
    listed = run_cli("jobs", *where, cwd=tmp_path)
    assert "sweep" in listed.stdout and "running: 0/4 done" in listed.stdout, listed
    killed = run_cli("kill", "sweep", "--index", "1", *where, cwd=tmp_path)
    assert killed.code == 0 and "sweep task 1: killed" in killed.stdout, killed
    gate.touch()
    server = crimpl.Local() if target.instanceId == "local" else crimpl.load_server("arrays")
    assert _final(server.get_job("sweep")).state == "failed"
    listed = run_cli("jobs", *where, cwd=tmp_path)
    assert "failed: task 2 failed (exit 4); task 1 killed" in listed.stdout, listed
    assert run_cli("logs", "sweep", "--index", "3", *where, cwd=tmp_path).stdout == "index 3\n"
    followed = run_cli("logs", "sweep", "--index", "3", "--follow", *where, cwd=tmp_path)
    assert followed.code == 0 and followed.stdout == "index 3\n", followed
    failed = run_cli("logs", "sweep", "--index", "2", "--follow", *where, cwd=tmp_path)
    assert failed.code == crimpl.ExitStatus.JOB_FAILED and "sweep failed (exit code 4)" in failed.stderr
    no_index = run_cli("logs", "sweep", *where, cwd=tmp_path)
    assert no_index.code != 0
    assert no_index.stderr.strip() == ("crimpl: error: job sweep is an array (tasks 0-3): pass the index of a "
                                       "task (index=7, or `crimpl logs --index 7`)")
    assert "--index takes a whole number" in run_cli("logs", "sweep", "--index", "x", *where, cwd=tmp_path).stderr


@pytest.mark.parametrize("flags, words", [
    (["--walltime", "2:00:00"], "--walltime goes to Slurm's sbatch; the local target has no scheduler"),
    (["--nprocs", "8", "--walltime", "1"], "--nprocs and --walltime go to Slurm's sbatch"),
    (["--nprocs", "many"], "--nprocs takes a whole number, got 'many'"),
    (["--array", "5-1"], "the range 5-1 runs backwards"),
    (["--array", "0-3", "--max-parallel", "0"], "max_parallel must be a whole number of tasks, 1 or more"),
])
def test_scheduler_and_array_flags_that_cannot_apply_are_one_line_errors(tmp_path, flags, words):
    script = tmp_path / "run.sh"
    script.write_text("true\n")
    result = run_cli("submit", script, *flags, "--stack", "local", cwd=tmp_path)
    assert result.code == crimpl.ExitStatus.ERROR
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert crimpl.Local().job_statuses() == {}


def test_submit_on_slurm_says_pending_for_a_queued_job_and_passes_nprocs_walltime_and_the_array(
        slurm_host, tmp_path):
    server = crimpl.RemoteSlurmServer(slurm_host.alias, directory=str(tmp_path / "remote-slurm"))
    server.save("hpc")
    gate = tmp_path / "gate"
    blocker = server.submit_script([_gate(gate)], nprocs=2, job_name="blocker", quiet=True)
    wait_until(lambda: blocker.job_status == "running", timeout=30, what="blocker running")
    script = tmp_path / "run.sh"
    script.write_text('echo "task $CRIMPL_ARRAY_INDEX of $SLURM_ARRAY_JOB_ID"\n')
    single = run_cli("submit", script, "--name", "queued", "--server", "hpc", "--quiet", cwd=tmp_path)
    assert single.code == 0 and "submitted queued: pending (`crimpl logs" in single.stdout, single
    swept = run_cli("submit", script, "--name", "sweep", "--server", "hpc", "--nprocs", "1", "--walltime",
                    "0:05:00", "--array", "0-2", "--max-parallel", "1", "--quiet", cwd=tmp_path)
    assert swept.code == 0 and "submitted sweep (an array of 3 tasks): pending" in swept.stdout, swept
    sweep = server.get_job("sweep")
    batch = (Path(sweep.job_dir) / "crimpl-sbatch.sh").read_text()
    for line in ("#SBATCH --array=0-2%1", "#SBATCH --ntasks=1", "#SBATCH --time=0:05:00"):
        assert line in batch
    assert {i: t.state for i, t in sweep.tasks.items()} == {0: "pending", 1: "pending", 2: "pending"}
    gate.touch()
    assert _final(sweep).state == "complete"
    slurm_id = (Path(sweep.job_dir) / "crimpl-slurm-id").read_text().strip()
    assert sweep.logs(index=2) == f"task 2 of {slurm_id}\n"
    assert _final(server.get_job("queued")).state == "complete"


# -- EC2 -----------------------------------------------------------------------------------


def test_an_array_on_ec2_runs_its_indexes_on_the_instance(ec2_server, tmp_path):
    marks = tmp_path / "marks.txt"
    job = ec2_server.submit_script(_marked(marks, fail=(1, 2)), array=4, max_parallel=2, quiet=True)
    status = _final(job)
    assert (status.state, status.detail) == ("failed", "task 1 failed (exit 2)")
    assert _most_at_once(marks) <= 2 and sorted(_started(marks)) == [0, 1, 2, 3]
    assert [job.logs(index=i) for i in range(4)] == [f"index {i}\n" for i in range(4)]
    assert job.tasks[3].state == "complete"
