"""invoke tasks for this repository: crimpl's own tasks plus the developers' ones.

``invoke --list`` shows them. The crimpl tasks (up, submit, logs, fetch, ...)
are the same ones the ``crimpl`` command runs; they live in ``crimpl/cli.py``.
"""

import sys
import uuid

from invoke import Collection, Exit, task

import crimpl
from crimpl import cli


@task
def test(c):
    """Run the test suite (the command CI runs)."""
    c.run("python -m pytest -q", pty=False)


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
        raise Exit(f"demo job {status}", code=1)


@task(help={"minutes": "stop by itself after this long", "stack": "write Pulumi.<stack>.yaml for it"})
def sandbox(c, minutes=60, stack="sandbox"):
    """Serve a loopback EC2 endpoint and sshd to try crimpl."""
    c.run(f"python tests/sandbox.py --dir /tmp/crimpl-sandbox --minutes {minutes} "
          f"--stack-file Pulumi.{stack}.yaml", pty=False)


ns = Collection(*cli.ns.tasks.values(), test, bench, demo, sandbox)
