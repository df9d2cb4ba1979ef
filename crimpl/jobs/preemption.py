"""Retries of a job a spot preemption ended: what the client does on its next look.

On the server, the watchdog (:mod:`crimpl.watchdog`) marks a job ``preempted`` when the
spot notice comes and sends it SIGTERM. A job submitted with ``retry_on_preemption=N``
has a file ``crimpl-attempt`` (``<attempt> <retries>``) in its directory. The next time
the client reads such a job (``status``, ``wait``, ``logs --follow``), it starts the job
again in place while attempts remain: same directory, same inputs, and its
``checkpoint/`` folder (``CRIMPL_CHECKPOINT_DIR``) kept, since a stopped spot instance
keeps its disk. Once the retries are spent, the job reads ``failed``: "preempted N times".
"""

import shlex

from ..errors import JobError
from . import protocol
from .protocol import ATTEMPT, job_dir, run


def attempt_line(attempt: int, retries: int) -> str:
    """Return the text of ``crimpl-attempt``."""
    return f"{attempt} {retries}\n"


def read_attempt(conn, root: str, name: str) -> tuple[int, int]:
    """Return ``(attempt, retries)`` of job ``name``; ``(1, 0)`` for a job without retries."""
    path = shlex.quote(f"{job_dir(root, name)}/{ATTEMPT}")
    words = run(conn, f"head -c 100 {path} 2> /dev/null").stdout.split()
    try:
        return int(words[0]), int(words[1])
    except (IndexError, ValueError):
        return 1, 0


def after_preemption(server, conn, name: str, status):
    """Start job ``name``, read ``preempted``, again if retries remain; return the status to report.

    :param server: the job's server (a :class:`~crimpl.jobs.JobsMixin`).
    :param status: the :class:`~crimpl.jobs.JobStatus` just read.
    """
    root = server.job_root
    attempt, retries = read_attempt(conn, root, name)
    if attempt > retries:
        status.state = "failed"
        status.detail = f"preempted {attempt} time{'s' if attempt > 1 else ''}"
        if retries:
            status.detail += f" (retry_on_preemption={retries})"
        return status
    path = shlex.quote(f"{job_dir(root, name)}/{ATTEMPT}")
    run(conn, f"printf %s {shlex.quote(attempt_line(attempt + 1, retries))} > {path}.tmp && mv -f {path}.tmp {path}")
    # Another client that saw the same preemption may have started it first ("running"): fine.
    outcome, detail = protocol.start(conn, root, name, again=True, allow_concurrent=True)
    if outcome not in ("started", "running"):
        raise JobError(f"job {name} was preempted and could not be started again ({outcome}"
                       f"{' ' + detail if detail else ''}): resubmit it")
    status = server._read_statuses(conn, [name])[name]
    # The notice may still be there and have ended this attempt already: each call is one attempt more.
    return after_preemption(server, conn, name, status) if status.state == "preempted" else status
