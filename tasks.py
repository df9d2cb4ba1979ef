"""invoke tasks for this repository: crimpl's own tasks plus the developers' ones.

``invoke --list`` shows them. The crimpl tasks (up, submit, logs, fetch, ...)
are the same ones the ``crimpl`` command runs; they live in ``crimpl/cli.py``.
invoke's own parser runs them here, so a job name is given as ``--job NAME``
and further fetch paths as ``--also PATH`` (the ``crimpl`` command also takes
them as plain words).
"""

import shlex
import sys
import uuid
from pathlib import Path

from invoke import Collection, Exit, task

import crimpl
from crimpl import cli
from crimpl.errors import ExitStatus

#: Where `invoke sandbox` keeps its state; `. /tmp/crimpl-sandbox/env.sh` points crimpl at it.
SANDBOX_DIR = "/tmp/crimpl-sandbox"


@task
def test(c):
    """Run the test suite (the command CI runs)."""
    c.run("python3 -m pytest -q -n auto", pty=False)


@task(help={"delay_ms": "added latency each way in ms (0: raw loopback)", "runs": "runs per case"})
def bench(c, delay_ms=20, runs=3):
    """Benchmark transfers against tar|ssh, rsync and scp."""
    c.run(f"python benchmarks/bench_transfer.py --delay-ms {delay_ms} --runs {runs} "
          "--json benchmarks/results/latest.json")


@task(help={"dest": "where the results land (default: demo-results/)"})
def demo(c, dest="demo-results"):
    """Run a real job end to end here, with no AWS account."""
    server = crimpl.Local()
    job = server.submit_script("examples/demo/run.sh", files=["examples/demo/data"],
                               job_name=f"demo-{uuid.uuid4().hex[:6]}")
    print(f"submitted {job.job_name} to {server}; its output:")
    job.logs(follow=True, stream=sys.stdout)
    status = job.wait(timeout=60, interval=0.2)
    print(f"{job.job_name}: {status}")
    report = job.check_output("results", dest + "/")
    print(f"fetched {len(report.files)} file(s) into {dest}/: {', '.join(report.files)}")
    if status.state != "complete":
        raise Exit(f"demo job {status}", code=ExitStatus.JOB_FAILED)


@task(help={"minutes": "stop by itself after this long", "stack": "write Pulumi.<stack>.yaml for it",
            "background": "run detached; return once it is ready (env.sh written)",
            "stop": "stop the sandbox started with --background",
            "folder": f"its working folder, where env.sh lands (default {SANDBOX_DIR})"})
def sandbox(c, minutes=60, stack="sandbox", background=False, stop=False, folder=SANDBOX_DIR):
    """Serve a loopback EC2 endpoint and sshd to try crimpl."""
    script = Path(__file__).resolve().parent / "tests" / "sandbox.py"
    argv = [sys.executable, str(script), "--dir", folder]
    if stop:
        argv.append("--stop")
    else:
        argv += ["--minutes", str(minutes), "--stack-file", f"Pulumi.{stack}.yaml"]
        if background:
            argv.append("--background")
    result = c.run(shlex.join(argv), pty=False, warn=True)
    if result.exited:
        raise Exit(code=result.exited)


ns = Collection(*cli.ns.tasks.values(), test, bench, demo, sandbox)
# The crimpl tasks' hints name the command they run under (see cli.command_name).
ns.configure({"crimpl": {"command": "invoke"}})
