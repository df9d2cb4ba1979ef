"""invoke tasks for this repository: crimpl's own tasks plus the developers' ones.

``invoke --list`` shows them. The crimpl tasks (up, submit, logs, fetch, ...)
are the same ones the ``crimpl`` command runs; they live in ``crimpl/cli.py``.
"""

from invoke import Collection, task

from crimpl import cli


@task
def test(c):
    """Run the test suite (the command CI runs)."""
    c.run("python -m pytest -q", pty=False)


@task(help={"delay_ms": "added latency each way in ms (0: raw loopback)", "runs": "runs per case"})
def bench(c, delay_ms=20, runs=3):
    """Benchmark transfers against tar|ssh, rsync and scp; writes benchmarks/results/latest.json."""
    c.run(f"python benchmarks/bench_transfer.py --delay-ms {delay_ms} --runs {runs} "
          "--json benchmarks/results/latest.json")


ns = Collection(*cli.ns.tasks.values(), test, bench)
