"""Retries of a job a spot preemption ended: what the client does on its next look.

On the server, the watchdog (:mod:`crimpl.watchdog`) marks a job ``preempted`` when the
spot notice comes and sends it SIGTERM. A job submitted with ``retry_on_preemption=N``
has a file ``crimpl-attempt`` (``<attempt> <retries> [lost]``) in its directory. What the
client does on its next look depends on what became of the instance:

- **It survived** (a stopped spot instance keeps its disk, and runs again): the client
  starts the job again in place (:func:`after_preemption`): same directory, same inputs,
  and its ``checkpoint/`` folder (``CRIMPL_CHECKPOINT_DIR``) kept.
- **It is gone** (terminated, as EC2 does with interruption behaviour ``terminate``): the
  client launches new capacity under the same server name (spot again, or on-demand with
  ``fallback_on_demand``) and submits the same job there (:func:`relaunch`): same job
  name, the same script and inputs sent again from the local paths recorded at submit.
  The checkpoint went with the old disk: the new attempt's ``CRIMPL_CHECKPOINT_DIR`` is
  empty and ``CRIMPL_CHECKPOINT_LOST=1`` tells the script so (it is ``0`` otherwise).

Every attempt sees ``CRIMPL_ATTEMPT`` (1, 2, ...). Once the retries are spent, the job
reads ``failed``: "preempted N times"; a preempted job is never reported complete.

The local record of a submit (:func:`remember`) is
``$CRIMPL_HOME/relaunch/<server name>/<job name>.json``, mode 0600: the local paths of the
script and inputs (or the list of commands), the options of the submit and the attempt;
no keys, no credentials. ``terminate`` and ``destroy`` of the server forget it.
"""

import json
import os
import shlex
import shutil

from ..errors import CrimplError, JobError
from ..home import crimpl_home, write_private_file
from ..log import say
from . import protocol
from .protocol import ATTEMPT, job_dir, run

#: The folder of the local records, in ``$CRIMPL_HOME``.
RECORDS = "relaunch"
#: What a record holds, and nothing else.
RECORD_FIELDS = ("server_name", "instance_id", "job_name", "script", "commands", "files", "retries", "attempt",
                 "fallback_on_demand", "on_complete", "allow_concurrent")


def attempt_line(attempt: int, retries: int, lost: bool = False) -> str:
    """Return the text of ``crimpl-attempt``; ``lost``: the previous attempt's checkpoint is gone."""
    return f"{attempt} {retries}{' lost' if lost else ''}\n"


def read_attempt(conn, root: str, name: str) -> tuple[int, int]:
    """Return ``(attempt, retries)`` of job ``name``; ``(1, 0)`` for a job without retries."""
    path = shlex.quote(f"{job_dir(root, name)}/{ATTEMPT}")
    words = run(conn, f"head -c 100 {path} 2> /dev/null").stdout.split()
    try:
        return int(words[0]), int(words[1])
    except (IndexError, ValueError):
        return 1, 0


def _failed(status, attempt, retries):
    status.state = "failed"
    status.detail = f"preempted {attempt} time{'s' if attempt > 1 else ''}"
    if retries:
        status.detail += f" (retry_on_preemption={retries})"
    return status


def after_preemption(server, conn, name: str, status):
    """Start job ``name``, read ``preempted``, again if retries remain; return the status to report.

    :param server: the job's server (a :class:`~crimpl.jobs.JobsMixin`).
    :param status: the :class:`~crimpl.jobs.JobStatus` just read.
    """
    root = server.job_root
    attempt, retries = read_attempt(conn, root, name)
    if attempt > retries:
        return _failed(status, attempt, retries)
    path = shlex.quote(f"{job_dir(root, name)}/{ATTEMPT}")
    run(conn, f"printf %s {shlex.quote(attempt_line(attempt + 1, retries))} > {path}.tmp && mv -f {path}.tmp {path}")
    _note_attempt(server, name, attempt + 1)
    # Another client that saw the same preemption may have started it first ("running"): fine.
    outcome, detail = protocol.start(conn, root, name, again=True, allow_concurrent=True)
    if outcome not in ("started", "running"):
        raise JobError(f"job {name} was preempted and could not be started again ({outcome}"
                       f"{' ' + detail if detail else ''}): resubmit it")
    status = server._read_statuses(conn, [name])[name]
    # The notice may still be there and have ended this attempt already: each call is one attempt more.
    return after_preemption(server, conn, name, status) if status.state == "preempted" else status


# -- relaunch on new capacity ------------------------------------------------------------


def _record_path(server, name):
    """The record of job ``name`` on ``server``, or None for a server kind that is never relaunched."""
    if getattr(server, "relaunch", None) is None:
        return None
    return crimpl_home() / RECORDS / server.server_name / f"{name}.json"


def remember(server, name: str, script, files, *, retries: int, fallback_on_demand: bool,
             on_complete: str | None, allow_concurrent: bool, attempt: int = 1) -> None:
    """Record what :func:`relaunch` needs to submit job ``name`` again on new capacity.

    Nothing is recorded without retries, or for a server kind that is never relaunched.

    :param script: the script's local path, or the list of commands, as given to the submit.
    :param files: the local paths of the inputs.
    """
    path = _record_path(server, name) if retries else None
    if path is None:
        return
    commands = list(script) if isinstance(script, (list, tuple)) else None
    record = {
        "server_name": server.server_name, "instance_id": server.instanceId, "job_name": name,
        "script": None if commands else os.path.abspath(os.path.expanduser(os.fspath(script))),
        "commands": commands,
        "files": [os.path.abspath(os.path.expanduser(os.fspath(f))) for f in files],
        "retries": retries, "attempt": attempt, "fallback_on_demand": fallback_on_demand,
        "on_complete": on_complete, "allow_concurrent": allow_concurrent,
    }
    write_private_file(path, json.dumps(record, indent=1) + "\n")


def _load(server, name):
    path = _record_path(server, name)
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot read {path} ({exc}): resubmit job {name} yourself") from exc
    if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
        raise JobError(f"{path} is not a record crimpl wrote: resubmit job {name} yourself")
    return record


def _note_attempt(server, name, attempt):
    """Keep the local record's attempt in step with an attempt started in place."""
    record = _load(server, name)
    if record is not None:
        remember(server, name, record["commands"] or record["script"], record["files"],
                 retries=record["retries"], fallback_on_demand=record["fallback_on_demand"],
                 on_complete=record["on_complete"], allow_concurrent=record["allow_concurrent"],
                 attempt=attempt)


def ended(server, name: str) -> None:
    """Drop the record of job ``name``, read ended on ``server``: it is never run again."""
    for path in (crimpl_home() / RECORDS).glob(f"*/{name}.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("instance_id") == server.instanceId:
            path.unlink(missing_ok=True)


def forget(server_name: str) -> None:
    """Drop the records of every job of ``server_name`` (the server was terminated on purpose)."""
    shutil.rmtree(crimpl_home() / RECORDS / server_name, ignore_errors=True)


def _check_sources(record, name):
    sources = ([] if record["commands"] else [record["script"]]) + record["files"]
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise JobError(f"job {name} was preempted and its server is gone; to send it again to new "
                       f"capacity crimpl needs {missing[0]}, which is missing here: restore it and look at "
                       f"the job again, or submit the job anew")


def _send(server, name, record):
    """Submit job ``name`` to ``server`` as the attempt after the record's."""
    try:
        server.submit_script(record["commands"] or record["script"], record["files"], job_name=name,
                             on_complete=record["on_complete"], allow_concurrent=record["allow_concurrent"],
                             retry_on_preemption=record["retries"], fallback_on_demand=record["fallback_on_demand"],
                             quiet=True, _attempt=record["attempt"] + 1)
    except CrimplError as exc:
        raise JobError(f"job {name} was preempted and {server} was launched for it, but the job could not "
                       f"be sent there ({exc}): look at the job again to send it") from exc


def gone_server(server_name: str, config=None):
    """The spot server ``server_name`` whose instance went away under a job that is to be retried.

    What a new ``crimpl`` process finds when it looks for the server by name and no live
    instance has it: the record of a job submitted with retries names the instance.

    :returns: ``(server, job_name)`` (an :class:`~crimpl.server.AWSEC2` for the gone
        instance), or None when no record waits for new capacity.
    """
    from ..server import AWSEC2

    for path in sorted((crimpl_home() / RECORDS / server_name).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS) \
                or record["attempt"] > record["retries"]:
            continue
        try:
            server = AWSEC2(record["instance_id"], config=config)
        except CrimplError:
            continue  # EC2 no longer describes it: nothing to relaunch from
        if server.state in ("shutting-down", "terminated"):
            return server, record["job_name"]
    return None


def relaunch(server, job):
    """Submit ``job`` again on new capacity, its spot server being gone; see the module docstring.

    :param server: an :class:`~crimpl.server.AWSEC2` whose spot instance was terminated.
    :param job: the :class:`~crimpl.jobs.Job` a look (``wait``, ``logs --follow``) was reading.
    :returns: True once the job runs on the new server; None when there is nothing to
        retry (no record: the job was not submitted with retries); the final
        :class:`~crimpl.jobs.JobStatus` (failed, "preempted N times") once retries are spent.
    :raises JobError: if the script or an input is missing locally (nothing is launched
        then), or the job could not be sent to the new capacity (the next look sends it).
    """
    from .api import JobStatus

    record = _load(server, job.job_name)
    if record is None:
        return None
    attempt, retries = record["attempt"], record["retries"]
    if attempt > retries:
        return _failed(JobStatus("preempted"), attempt, retries)
    _check_sources(record, job.job_name)
    spot = not record["fallback_on_demand"]
    say(f"job {job.job_name} was preempted and {server} is gone: launching {'spot' if spot else 'on-demand'} "
        f"capacity for attempt {attempt + 1} of {retries + 1}")
    server.relaunch(spot=spot)
    _send(server, job.job_name, record)
    return True


def send_to_relaunched(server, name: str) -> bool:
    """Send job ``name``, not found on ``server``, if ``server`` is capacity relaunched for it that
    the job never reached (the send after the launch failed); return True if it did."""
    if not any((crimpl_home() / RECORDS).glob(f"*/{name}.json")):
        return False  # the common case, without asking EC2 for the server's name
    record = _load(server, name)
    if record is None or record["instance_id"] == server.instanceId or record["attempt"] > record["retries"]:
        return False
    _check_sources(record, name)
    _send(server, name, record)
    return True
