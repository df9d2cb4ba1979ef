"""The job API: :class:`Job`, :class:`JobStatus` and :class:`JobsMixin`, which every server kind has.

The API only talks to the server through :mod:`.protocol`. It decides what a
failure means: a server that cannot be reached (SSH not answering, connection
lost, instance not running) makes a job's state ``unknown``; any other error
(configuration, host key, AWS credentials) is raised. Every wait is bounded: a
server that stopped or went away ends :meth:`Job.wait` and ``Job.logs(follow=True)``
with :class:`~crimpl.errors.JobUnreachableError`, which names the job's last state.
"""

import codecs
import contextlib
import functools
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import (
    ConnectionLostError,
    CrimplError,
    InstanceStateError,
    JobError,
    JobUnreachableError,
    ScriptFailedError,
    SSHNotReadyError,
    TransferError,
)
from ..ssh import counted
from ..transfer.store import DEFAULT_CAP, CleanReport
from . import arrays, preemption, protocol
from .legacy import LegacyJobNames, LegacyServerNames
from .protocol import COMMANDS_SCRIPT, ON_COMPLETE, STATES, WRAPPER, check_job_name, job_dir

#: The errors that mean "the server cannot be reached now"; only they make a state ``unknown``.
UNREACHABLE = (SSHNotReadyError, ConnectionLostError, InstanceStateError)
#: Server states in which a job can no longer be reached, and how messages name them.
GONE = {"stopping": "stopped", "stopped": "stopped", "shutting-down": "terminated",
        "terminated": "terminated"}
#: Consecutive failed polls (or reconnects) after which a wait gives up.
MAX_UNREACHABLE = 5


@dataclass
class JobStatus:
    """What the server reports about one job.

    :param state: one of :data:`~crimpl.jobs.protocol.STATES`.
    :param exit_code: the script's exit code once it ended.
    :param started: UTC ISO time the job started.
    :param ended: UTC ISO time it ended.
    :param on_complete: ``stop``, ``terminate`` or None.
    :param detail: why the state is what it is, when that is not obvious.
    :param tasks: of an array job, ``{index: JobStatus}`` of each task (:mod:`.arrays`); else None.
    """

    state: str
    exit_code: int | None = None
    started: str | None = None
    ended: str | None = None
    on_complete: str | None = None
    detail: str = ""
    tasks: dict | None = field(default=None, repr=False, compare=False)

    def __str__(self):
        text = self.state
        if self.state == "failed" and self.exit_code is not None:
            text += f" (exit code {self.exit_code})"
        return text + (f": {self.detail}" if self.detail else "")


def _statuses(conn, root, names=None):
    """``{job_name: JobStatus}`` for the jobs that exist (all of them when ``names`` is None)."""
    return {name: arrays.local_status(fields) for name, fields in protocol.read_records(conn, root, names).items()}


def _server_state(server):
    """The state of the server's machine where its kind knows it (EC2's ``state``), else None."""
    try:
        return getattr(server, "state", None)
    except CrimplError:  # EC2 unreachable too: no answer, the caller counts a failure
        return None


def _write(stream, text):
    """Write ``text`` to ``stream`` (default stdout) and flush it, so a terminal shows it now."""
    stream = stream or sys.stdout
    stream.write(text)
    if hasattr(stream, "flush"):
        stream.flush()


class Job(LegacyJobNames):
    """A job on a server. It is only a name: every property is read from the server.

    :param server: the :class:`~crimpl.server.AWSEC2` or :class:`~crimpl.server.Local` it runs on.
    :param job_name: its name, the name of its directory.
    :param sources: the local script and inputs it was submitted with (for :meth:`resubmit`).
    """

    def __init__(self, server, job_name: str, sources=None):
        check_job_name(job_name)
        self.server = server
        self.job_name = job_name
        self._sources = list(sources or [])
        #: The last status read from the server, named when the server goes away.
        self.last_status: JobStatus | None = None
        #: What the upload of its inputs did, when this object submitted (or resubmitted) it.
        self.upload_report = None
        #: The status its start answered with, when this object submitted it (None: not known).
        self.start_status: JobStatus | None = None
        #: Retries asked for at submit: a wait may then start the spot server a preemption stopped.
        self.retry_on_preemption = 0

    def __repr__(self):
        return f"<Job {self.job_name} on {self.server}>"

    @property
    def job_dir(self) -> str:
        """The job's directory on the server."""
        return job_dir(self.server.job_root, self.job_name)

    def _read(self, conn) -> JobStatus:
        status = self.server._read_statuses(conn, [self.job_name]).get(self.job_name)
        if status is None and preemption.send_to_relaunched(self.server, self.job_name):
            status = self.server._read_statuses(conn, [self.job_name]).get(self.job_name)
        if status is not None and status.state == "preempted":
            # Every look at the job is where a retry on preemption happens (crimpl.jobs.preemption).
            status = preemption.after_preemption(self.server, conn, self.job_name, status)
        if status is not None and status.state in ("complete", "failed", "killed"):
            preemption.ended(self.server, self.job_name)  # never relaunched once it ended
        self.last_status = status or JobStatus("not-submitted")
        return self.last_status

    def status(self) -> JobStatus:
        """Return the job's :class:`JobStatus`, read from the server now.

        A server that cannot be reached (stopped, SSH not answering) gives state
        ``unknown``; any other error is raised.
        """
        try:
            with self.server.session(start=False) as conn:
                return self._read(conn)
        except UNREACHABLE as exc:
            return JobStatus("unknown", detail=str(exc))

    @property
    def job_status(self) -> str:
        """The job's state: one of :data:`STATES`."""
        return self.status().state

    def _gone(self, state, failures=0, cause=None):
        """The error that ends a wait on this job: its server is ``state``, or unreachable."""
        last = self.last_status or "not read yet"
        if state in GONE:
            what = "stopped" if GONE[state] == "stopped" else "went away"
            advice = ("start it to read the job's logs and outputs" if GONE[state] == "stopped"
                      else "its jobs and files are gone")
            return JobUnreachableError(
                f"the server {what} ({self.server} is {state}); job {self.job_name}'s last state "
                f"was {last}: {advice}", self.last_status, state)
        return JobUnreachableError(
            f"{self.server} did not answer {failures} time(s) in a row (last: {cause}); job "
            f"{self.job_name}'s last state was {last}: check the server, then look at the job again",
            self.last_status, state)

    def _on_unreachable(self, exc, failures, max_unreachable):
        """Raise if the server is gone or stayed unreachable too long; else return None, or the
        job's final status when a preemption spent its retries."""
        state = getattr(exc, "state", None) or _server_state(self.server)
        relaunch = getattr(self.server, "_relaunch_after_preemption", None)
        outcome = relaunch(self) if relaunch is not None else None
        if isinstance(outcome, JobStatus):
            return outcome
        if outcome:
            return None  # its spot server runs again, or new capacity does: the next look sees the job
        if state in GONE:
            raise self._gone(state) from exc
        if failures >= max_unreachable:
            raise self._gone(state, failures, exc) from exc

    def _ended(self):
        """The last status read, if it says the job ended."""
        last = self.last_status
        return last if last is not None and last.state in ("complete", "failed", "killed") else None

    def wait(self, timeout: float | None = None, interval: float = 2.0,
             max_unreachable: int = MAX_UNREACHABLE) -> JobStatus:
        """Poll until the job is no longer running and return its final :class:`JobStatus`.

        :param timeout: seconds to wait at most (default: no limit while the server answers).
        :param interval: seconds between two polls.
        :param max_unreachable: consecutive polls that could not reach the server
            after which the wait gives up.
        :raises JobError: if ``timeout`` seconds pass first.
        :raises JobUnreachableError: if the server is stopped or terminated, or could
            not be reached ``max_unreachable`` times in a row; it names the job's last state.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        with contextlib.ExitStack() as held:
            conn = None
            while True:
                # One connection for every poll; a new one only after it failed.
                try:
                    if conn is None:
                        conn = held.enter_context(self.server.session(start=False))
                    status = self._read(conn)
                    failures = 0
                except UNREACHABLE as exc:
                    conn = None
                    held.close()
                    failures += 1
                    if self._ended():
                        # Read before the server went away (on_complete=stop): the job had ended.
                        return self._ended()
                    final = self._on_unreachable(exc, failures, max_unreachable)
                    if final is not None:
                        self.last_status = final
                        return final
                    status = JobStatus("unknown", detail=str(exc))
                # "unknown" read from the server (a malformed record) will not change by waiting.
                ended = status.state not in ("running", "pending")
                if ended and (status.state != "unknown" or failures == 0):
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobError(f"job {self.job_name} still {status.state} after {timeout:.0f} s")
                time.sleep(interval)

    @property
    def tasks(self) -> dict | None:
        """Of an array job, ``{index: JobStatus}`` of every task, read now; None for another job."""
        return self.status().tasks

    def logs(self, follow: bool = False, stream=None, max_unreachable: int = MAX_UNREACHABLE,
             index: int | None = None) -> str:
        """Return the job's log; with ``follow=True`` also stream it to ``stream``
        (default stdout) until the job ends.

        A follow whose connection drops reconnects and goes on from the last byte
        it received; it never starts a stopped server.

        :param index: of an array job, the task whose log to show (an array has no
            log of its own: without it, the error names the indexes).
        :raises JobUnreachableError: if the server stopped or went away, or could
            not be reached ``max_unreachable`` times in a row, before the job ended.
        :raises JobError: for an array job without ``index``, or an ``index`` it has not.
        """
        if not follow:
            with self.server.session(start=False) as conn:
                if index is not None:
                    arrays.task_of(self._read(conn), self.job_name, index)
                return protocol.read_log(conn, self.server.job_root, self.job_name, index)
        received = 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = []
        failures = 0
        while True:
            try:
                with self.server.session(start=False) as conn:
                    arrays.check_index(self._read(conn), self.job_name, index)
                    for chunk in self.server._stream_log(conn, self.job_name, received, index=index):
                        if not chunk:
                            # Silence: a server stopped under a live connection says nothing either.
                            state = _server_state(self.server)
                            if state in GONE:
                                raise self._gone(state)
                            continue
                        received += len(chunk)
                        failures = 0
                        piece = decoder.decode(chunk)
                        text.append(piece)
                        _write(stream, piece)
                    with contextlib.suppress(*UNREACHABLE):
                        # The final state, when the server still answers (on_complete may stop it).
                        self._read(conn)
                if index is None and self.last_status is not None and self.last_status.state == "running":
                    received = 0  # started again after a preemption: follow the new attempt's log
                    continue
                break
            except UNREACHABLE as exc:
                failures += 1
                final = self._on_unreachable(exc, failures, max_unreachable)
                if final is not None:
                    self.last_status = final
                    break
        text.append(decoder.decode(b"", final=True))
        return "".join(text)

    def kill(self, index: int | None = None) -> bool:
        """End the job's whole process group. Returns True if it was running.

        Of an array job, every task that runs ends and no other starts.

        :param index: end only this task of an array job (if it waits, it never starts).
        """
        with self.server.session(start=False) as conn:
            if index is not None:
                arrays.task_of(self._read(conn), self.job_name, index)
            return self.server._kill(conn, self.job_name, index=index)

    def resubmit(self, files=None, *, allow_concurrent: bool = False, quiet: bool = False) -> "Job":
        """Run this job again in place, re-sending only inputs that changed.

        See :meth:`JobsMixin.resubmit`.

        :param files: inputs to upload again; default: those given when this
            object submitted the job (none for a job found by name).
        """
        return self.server.resubmit(self, files if files is not None else self._sources,
                                    allow_concurrent=allow_concurrent, quiet=quiet)

    def check_output(self, server_path, local_path=".", quiet: bool = False):
        """Copy outputs of this job to ``local_path``; see :meth:`JobsMixin.check_output`."""
        return self.server.check_output(server_path, local_path, job=self, quiet=quiet)

    def ls(self) -> list:
        """Return the files in the job directory, relative to it."""
        with self.server.session(start=False) as conn:
            return protocol.list_files(conn, self.server.job_root, self.job_name)


def _path_name(item, what):
    """Return the name ``item`` gets in the job directory; refuse what is not a usable path."""
    if isinstance(item, bytes) or not isinstance(item, (str, os.PathLike)):
        raise JobError(f"{what} must be a path, got {type(item).__name__} {item!r}"[:200])
    text = os.fspath(item)
    if not text.strip():
        # Path("") is ".", the current folder: never what an empty argument meant.
        raise JobError(f"{what} is an empty path: name a file or directory")
    # As the upload names it: the basename of the path given, a symlink not resolved.
    return os.path.basename(os.path.abspath(os.path.expanduser(text)))


def _script_sources(script, workdir):
    """Return ``(entry_name, local_path)`` for a script path or a list of commands."""
    if isinstance(script, (list, tuple)):
        if not script or not all(isinstance(c, str) for c in script):
            raise JobError("script must be a path or a non-empty list of command strings")
        path = Path(workdir) / COMMANDS_SCRIPT
        path.write_text("set -e\n" + "\n".join(script) + "\n", encoding="utf-8")
        return COMMANDS_SCRIPT, path
    if isinstance(script, bytes) or not isinstance(script, (str, os.PathLike)):
        raise JobError(f"script must be a path or a list of commands, got {type(script).__name__}")
    name = _path_name(script, "script")
    path = Path(script).expanduser()
    if not path.is_file():
        raise JobError(f"script {path} does not exist: pass a path to a shell script or a list of commands")
    if protocol.reserved_name(name, script=True):
        why = "starts with '-'" if name.startswith("-") else "is a name crimpl keeps for its own files"
        raise JobError(f"script {path} is named {name!r}, which {why}: rename it")
    return name, path


def _check_files(files, entry):
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    elif isinstance(files, bytes):
        raise JobError("files must be a path or a list of paths, got bytes")
    else:
        try:
            files = list(files)
        except TypeError:
            raise JobError(f"files must be a path or a list of paths, got {type(files).__name__}") from None
    paths = []
    names = {entry}
    for item in files:
        name = _path_name(item, "an input in files")
        path = Path(item).expanduser()
        if not path.exists():
            raise JobError(f"input {path} does not exist: nothing was sent")
        if name in names or protocol.reserved_name(name):
            raise JobError(f"input {path} would land as {name!r} in the job directory, which "
                           f"{'another input or the script has' if name in names else 'crimpl keeps for itself'}: "
                           "rename it")
        names.add(name)
        paths.append(path)
    return paths


class _Held(threading.local):
    """The connection a :meth:`JobsMixin.connected` block shares, in one thread."""

    depth = 0
    conn = None
    stack = None


def _alive(conn):
    """Can ``conn`` still carry commands? (A local target's context always can.)"""
    return getattr(conn, "is_connected", True)


def shares_connection(session):
    """Make a server kind's ``session`` yield the connection its :meth:`~JobsMixin.connected`
    block holds: opened by the first session of the block (with that session's ``start``),
    again only if it was lost, and closed when the block ends. Outside such a block each
    session opens and closes its own, as before."""

    @functools.wraps(session)
    @contextlib.contextmanager
    def shared(self, *args, **kwargs):
        held = self._held()
        if not held.depth:
            with session(self, *args, **kwargs) as conn:
                yield conn
            return
        if held.conn is None or not _alive(held.conn):
            held.conn = None
            held.stack.close()
            held.conn = held.stack.enter_context(session(self, *args, **kwargs))
        yield held.conn

    return shared


class JobsMixin(LegacyServerNames):
    """The job API shared by every server kind.

    A subclass provides ``job_root`` (the remote root folder), ``session(start)``
    (a context manager yielding one open connection, starting the server when
    ``start`` is true), ``shutdown_command`` and ``_prepare_on_complete(on_complete)``.
    A server kind that knows its machine's state (``running``, ``stopped``,
    ``terminated`` ...) exposes it as ``state``; waits then end as soon as it stops.

    Job inputs go through a store beside the job directories (:attr:`store_dir`,
    see :mod:`crimpl.transfer.store`): a file another job already sent is linked,
    not sent again.
    """

    #: Size cap of the store in bytes; unlinked inputs beyond it are evicted, oldest first.
    store_cap: int = DEFAULT_CAP

    def _held(self) -> _Held:
        """This server's shared connection in this thread (see :meth:`connected`)."""
        return self.__dict__.setdefault("_held_connection", _Held())

    @contextlib.contextmanager
    def connected(self):
        """Share one SSH connection among everything done with this server in the block.

        The connection opens at the first command that needs one (none if nothing does),
        opens again only if it was lost, and closes when the block ends: it never
        outlives the block. It is this thread's; blocks may nest. The job API's calls
        of several steps (:meth:`check_output`, :meth:`run_script`) run in one, and so
        does each task of the ``crimpl`` command.
        """
        held = self._held()
        held.depth += 1
        if held.depth == 1:
            held.stack = contextlib.ExitStack()
        try:
            yield self
        finally:
            held.depth -= 1
            if not held.depth:
                held.conn = None
                held.stack.close()

    @property
    def store_dir(self) -> str:
        """The store of job inputs on the server: ``objects`` beside ``jobs`` in the remote root."""
        return f"{self.job_root.rstrip('/')}/objects"

    def clean(self, older_than_days: float = 7, *, dry_run: bool = False) -> CleanReport:
        """Remove the jobs that ended ``older_than_days`` ago or earlier, then every input no job links.

        Jobs that run, never started or read ``unknown`` are kept.

        :param older_than_days: age of the end of a job, in days, from which it goes.
        :param dry_run: list what would go, remove nothing.
        :returns: a :class:`~crimpl.transfer.store.CleanReport` with the job names.
        :raises JobError: if ``older_than_days`` is negative.
        """
        from ..transfer import store

        if isinstance(older_than_days, bool) or not isinstance(older_than_days, (int, float)) \
                or older_than_days < 0:
            raise JobError(f"older_than_days must be a number of days, 0 or more, got {older_than_days!r}")
        cutoff = datetime.now(timezone.utc) - timedelta(days=older_than_days)
        with self.session(start=False) as conn:
            statuses = self._read_statuses(conn)
            old = sorted(name for name, status in statuses.items()
                         if status.state in ("complete", "failed", "killed")
                         and _ended_before(status.ended, cutoff))
            report = store.clean(conn, self.store_dir, [job_dir(self.job_root, n) for n in old],
                                 dry_run=dry_run)
        report.jobs = [path.rsplit("/", 1)[-1] for path in report.jobs]
        return report

    def submit_script(self, script, files=None, *, job_name: str | None = None,
                      on_complete: str | None = None, allow_concurrent: bool = False,
                      quiet: bool = False, retry_on_preemption: int = 0, array=None,
                      max_parallel: int | None = None, fallback_on_demand: bool = False,
                      _attempt: int = 1) -> Job:
        """Send ``script`` and ``files`` to the server and start it detached.

        A submit that was interrupted (the connection dropped during the upload)
        is completed by submitting again with the same ``job_name``.

        :param script: path of a shell script, or a list of commands.
        :param files: files or directories copied beside the script.
        :param job_name: name of the job (default: time and script name).
        :param on_complete: ``"stop"`` or ``"terminate"`` the server when the
            script ends (default None: keep it running).
        :param allow_concurrent: allow this job to start while another runs.
        :param retry_on_preemption: start the job again up to this many times when a spot
            preemption ends it: in place, or on new capacity when the instance is gone
            (see :mod:`crimpl.jobs.preemption`).
        :param fallback_on_demand: that new capacity is on-demand, not spot again.
        :param _attempt: (set by a relaunch on new capacity) the attempt this submit starts.
        :param array: run the script once per index, as a job array: a number of tasks
            ``N`` (indexes 0 to N-1) or Slurm's syntax (``"0-99%10"``, ``"1,3,5-7"``);
            each task sees ``CRIMPL_ARRAY_INDEX`` (see :mod:`crimpl.jobs.arrays`).
        :param max_parallel: at most this many tasks of the array at a time (default:
            the ``%`` of ``array``, else the server's CPU count).
        :returns: the :class:`Job`, already running.
        :raises JobError: if the name is taken, or another job is running (checked
            atomically on the server: of two submits at once, one starts).
        """
        if on_complete not in ON_COMPLETE:
            raise JobError(f"on_complete must be 'stop', 'terminate' or None, got {on_complete!r}")
        if job_name is not None:
            check_job_name(job_name)
        if isinstance(retry_on_preemption, bool) or not isinstance(retry_on_preemption, int) \
                or retry_on_preemption < 0:
            raise JobError(f"retry_on_preemption must be a whole number, 0 or more, got {retry_on_preemption!r}")
        if fallback_on_demand not in (False, True):
            raise JobError(f"fallback_on_demand must be True or False, got {fallback_on_demand!r}")
        if fallback_on_demand and not retry_on_preemption:
            raise JobError("fallback_on_demand needs retry_on_preemption (--retry-on-preemption N): "
                           "it says what a retry runs on")
        spec = arrays.submitted_spec(array, max_parallel, retry_on_preemption)
        with tempfile.TemporaryDirectory(prefix="crimpl-submit-") as workdir:
            entry, script_path = _script_sources(script, workdir)
            inputs = _check_files(files, entry)
            name = job_name or protocol.new_job_name(entry)
            wrapper = Path(workdir) / WRAPPER
            wrapper.write_text(protocol.render_wrapper(name, entry, on_complete, self.shutdown_command),
                               encoding="utf-8")
            crimpl_files = [wrapper]
            if retry_on_preemption:
                crimpl_files.append(Path(workdir) / protocol.ATTEMPT)
                crimpl_files[-1].write_text(preemption.attempt_line(_attempt, retry_on_preemption, lost=_attempt > 1),
                                            encoding="utf-8")
            if spec is not None:
                crimpl_files.append(Path(workdir) / protocol.ARRAY)
                crimpl_files[-1].write_text(f"{spec}\n", encoding="utf-8")
            with counted() as trips, self.session(start=True) as conn:
                report, started = self._send_and_start(conn, name, [script_path, *crimpl_files, *inputs],
                                              on_complete=on_complete, allow_concurrent=allow_concurrent,
                                              quiet=quiet)
            report.connections, report.channels = trips.connections, trips.channels
        preemption.remember(self, name, script, inputs, retries=retry_on_preemption, attempt=_attempt,
                            fallback_on_demand=fallback_on_demand, on_complete=on_complete,
                            allow_concurrent=allow_concurrent)
        # A list of commands lives in the job directory already; a script file may change locally.
        sources = ([script_path] if entry != COMMANDS_SCRIPT else []) + inputs
        job = Job(self, name, sources=sources)
        job.upload_report = report
        job.retry_on_preemption = retry_on_preemption
        # The start's own answer: the job's first record (an array's tasks have none yet).
        job.start_status = started if spec is None else None
        return job

    # -- what a server kind with a scheduler replaces (crimpl.slurm) ------------------------

    def _read_statuses(self, conn, names=None) -> dict:
        """``{job_name: JobStatus}`` of the given jobs that exist (every job when ``names`` is None)."""
        return _statuses(conn, self.job_root, names)

    def _kill(self, conn, name, index=None) -> bool:
        """End job ``name`` (its task ``index``); return True if it was running."""
        return protocol.kill(conn, self.job_root, name, index=index)

    def _stream_log(self, conn, name, offset, index=None):
        """Yield job ``name``'s log (its task ``index``'s) from byte ``offset`` while it runs
        (:func:`protocol.stream_log`)."""
        return protocol.stream_log(conn, self.job_root, name, offset=offset, index=index)

    def _exists(self, name):
        return JobError(f"a job named {name} already exists on {self}; choose another job_name")

    def _never_uploaded(self, name):
        return JobError(f"job {name} on {self} was never completely uploaded: "
                        f"submit it again with job_name={name!r}")

    def _busy(self, other):
        return JobError(f"another job is running on {self}: {other}; wait for it, kill it, "
                        "or pass allow_concurrent=True (--allow-concurrent)")

    def _send_and_start(self, conn, name, sources, *, on_complete, allow_concurrent, quiet):
        """Upload a new job's files and start it; return the upload's report and the
        :class:`JobStatus` the start answered with (None where a scheduler's :meth:`_start` ran).

        Where this kind starts jobs with the protocol's own start, the quick check (name
        free, no other job running), the upload and the start are ONE remote command; a
        kind with its own :meth:`_start` (a scheduler's) gets a check, the upload, then
        :meth:`_start`. With ``on_complete`` the check goes first on its own, so that a
        refused job never changes the server's shutdown behaviour.
        """
        from .. import transfer

        folded = self._folds_start()
        if on_complete or not folded:
            self._check_free(conn, name, allow_concurrent)
            if on_complete:
                self._prepare_on_complete(on_complete)
        steps = {}
        if folded:
            steps = {"guard": protocol.guard_script(self.job_root, name, allow_concurrent=allow_concurrent),
                     "then": protocol.start_script(self.job_root, name, allow_concurrent=allow_concurrent)}
        try:
            report = transfer.upload(conn, sources, job_dir(self.job_root, name), quiet=quiet,
                                     store=self.store_dir, store_cap=self.store_cap, **steps)
        except TransferError as exc:
            raise TransferError(f"{exc} (job {name} was not started: submit again with "
                                f"job_name={name!r} to complete it)") from exc
        started = None
        if not folded:
            self._start(conn, name, again=False, allow_concurrent=allow_concurrent)
        elif report.refused:
            outcome, _, detail = report.refused.partition(" ")
            if outcome == "busy":
                raise self._busy(detail)
            if outcome == "exists":
                raise self._exists(name)
            raise JobError(f"submitting job {name} failed on the server: unexpected answer {outcome!r}")
        else:
            started = self._started_after_upload(name, report)
        return report, started

    def _check_free(self, conn, name, allow_concurrent):
        """Raise unless a new job ``name`` may start: the name is free and, unless
        ``allow_concurrent``, no other job runs. (The start checks again, atomically.)"""
        existing = self._read_statuses(conn)
        # A job directory never started is what an interrupted submit left: complete it.
        if name in existing and existing[name].state != "not-submitted":
            raise self._exists(name)
        running = sorted(n for n, s in existing.items() if s.state == "running")
        if running and not allow_concurrent:
            raise self._busy(running[-1])

    def _folds_start(self) -> bool:
        """Does this kind start jobs with the protocol's own start, which an upload can run
        at its end (no :meth:`_start` of its own, as a scheduler's kind has)?"""
        return type(self)._start is JobsMixin._start

    def _started_after_upload(self, name, report) -> JobStatus:
        """Return the status of a job started at the end of an upload (``then``); raise if it did not start."""
        if report.then_status == -1:
            raise ConnectionLostError(f"lost the SSH connection while job {name} was starting on {self}: "
                                      f"`crimpl jobs` shows whether it started; if not, submit it again "
                                      f"with job_name={name!r}")
        if report.then_status != 0:
            last = report.then_output.strip().splitlines()
            raise JobError(f"starting job {name} failed on the server (exit {report.then_status}): "
                           f"{last[-1] if last else 'no output'}")
        return self._started(name, *protocol.parse_start(report.then_output, name))

    def _start(self, conn, name, *, again, allow_concurrent):
        self._started(name, *protocol.start(conn, self.job_root, name, again=again,
                                            allow_concurrent=allow_concurrent))

    def _started(self, name, outcome, detail) -> JobStatus:
        """Return the first status of a job whose start said ``outcome`` (:func:`protocol.start`);
        raise the error if it did not start."""
        if outcome == "started":
            if detail["state"] == "not-submitted":
                raise JobError(f"job {name} did not start within {protocol.START_WAIT} s; see "
                               f"{job_dir(self.job_root, name)}/{protocol.LOG}")
            return JobStatus(**detail)
        if outcome == "exists":
            raise self._exists(name)
        if outcome == "busy":
            raise self._busy(detail)
        if outcome == "running":
            raise JobError(f"job {name} is still running: kill it before resubmitting")
        if outcome == "missing":
            raise self._never_uploaded(name)
        raise JobError(f"another submit to {self} holds {self.job_root}/jobs/{protocol.LOCK} "
                       f"(process {detail}); try again, or remove that folder if no submit is running")

    def resubmit(self, job, files=None, *, allow_concurrent: bool = False, quiet: bool = False) -> Job:
        """Run a job that ended (or was never started) again in place.

        Its log moves to ``crimpl-log.previous``; only inputs that changed are sent again.

        :param job: a :class:`Job` or a job name.
        :param files: inputs to upload again before it starts.
        :param allow_concurrent: start even while another job runs.
        :returns: the :class:`Job`, running.
        :raises JobError: if there is no such job, it is running, or another job is.
        """
        from .. import transfer

        if not isinstance(job, Job):
            job = Job(self, job)
        if files is not None:
            files = _check_files(files, None)
        with counted() as trips, self.session(start=True) as conn:
            status = self._read_statuses(conn, [job.job_name]).get(job.job_name)
            if status is None:
                raise JobError(f"no job {job.job_name} on {self}: `jobs` lists the jobs there")
            if status.state == "running":
                raise JobError(f"job {job.job_name} is still running: kill it before resubmitting")
            report = None
            if files and self._folds_start():
                # The upload and the start in one remote command.
                report = transfer.upload(conn, files, job.job_dir, quiet=quiet, store=self.store_dir,
                                         store_cap=self.store_cap,
                                         then=protocol.start_script(self.job_root, job.job_name, again=True,
                                                                    allow_concurrent=allow_concurrent))
                self._started_after_upload(job.job_name, report)
            else:
                if files:
                    report = transfer.upload(conn, files, job.job_dir, quiet=quiet, store=self.store_dir,
                                             store_cap=self.store_cap)
                self._start(conn, job.job_name, again=True, allow_concurrent=allow_concurrent)
        if report is not None:
            report.connections, report.channels = trips.connections, trips.channels
        job.last_status = None
        job.upload_report = report
        return job

    def run_script(self, script, files=None, *, stream=None, **kwargs) -> int:
        """Run ``script`` and wait for it, streaming its output as it comes.

        The script runs as a job (so it survives a dropped connection).

        :returns: the exit code, 0.
        :raises ScriptFailedError: if it exits non-zero, with the code and the last lines.
        """
        if kwargs.get("array") is not None:
            raise JobError("run_script runs one script: submit an array with submit_script(..., array=...)")
        with self.connected():
            job = self.submit_script(script, files, **kwargs)
            text = job.logs(follow=True, stream=stream)
            status = job.wait(interval=1.0)
        if status.state != "complete":
            tail = "\n".join(text.rstrip().splitlines()[-20:])
            last = tail.splitlines()[-1] if tail else "no output"
            raise ScriptFailedError(
                f"job {job.job_name} {status}; last line: {last} (`crimpl logs --job {job.job_name}` shows all)",
                exit_code=status.exit_code, tail=tail,
            )
        return status.exit_code

    @property
    def jobs(self) -> list:
        """All jobs on the server, oldest first, as :class:`Job` objects."""
        return [Job(self, name) for name in self.job_statuses()]

    def job_statuses(self) -> dict:
        """Return ``{job_name: JobStatus}`` for every job, oldest first."""
        with self.session(start=False) as conn:
            statuses = self._read_statuses(conn)
            for name in [n for n, s in statuses.items() if s.state == "preempted"]:
                statuses[name] = preemption.after_preemption(self, conn, name, statuses[name])
        return {name: statuses[name] for name in _by_start(statuses)}

    def get_job(self, job_name: str | None = None) -> Job:
        """Return the job named ``job_name``, or the latest job when None.

        :raises JobError: if there is no such job; the message lists the jobs.
        """
        if job_name is not None:
            check_job_name(job_name)
        statuses = self.job_statuses()
        names = list(statuses)
        if job_name is None:
            if not names:
                raise JobError(f"no jobs on {self} yet: submit one first")
            return Job(self, names[-1])
        if job_name not in statuses:
            raise JobError(f"no job {job_name} on {self}; jobs: {', '.join(names) or 'none'}")
        return Job(self, job_name)

    @property
    def job_status(self) -> str:
        """State of the latest job ('not-submitted' if there is none, 'unknown' if unreachable)."""
        try:
            statuses = self.job_statuses()
        except UNREACHABLE:
            return "unknown"
        return statuses[list(statuses)[-1]].state if statuses else "not-submitted"

    def check_output(self, server_path, local_path=".", *, job=None, quiet: bool = False):
        """Copy a job's outputs to ``local_path``.

        :param server_path: path(s) relative to the job directory: files,
            directories or globs; a string or a list.
        :param local_path: destination file or directory.
        :param job: a :class:`Job` or job name; default the latest job.
        :returns: the transfer report; ``report.replaced`` lists local files that
            were overwritten with different content; ``connections`` and ``channels``
            count what the whole call opened.
        """
        from .. import transfer

        paths = [server_path] if isinstance(server_path, (str, os.PathLike)) else server_path
        if not isinstance(paths, (list, tuple)) or not paths or not all(
                isinstance(p, (str, os.PathLike)) and os.fspath(p).strip() for p in paths):
            raise TransferError(f"server_path must be a path or a list of paths in the job directory, "
                                f"got {server_path!r}"[:200])
        if isinstance(local_path, bytes) or not isinstance(local_path, (str, os.PathLike)) \
                or not os.fspath(local_path).strip():
            raise TransferError(f"local_path must be a local file or directory, got {local_path!r}"[:200])
        with counted() as trips, self.connected():
            named = isinstance(job, str)
            if named:
                check_job_name(job)
                job = Job(self, job)  # its folder is looked for by the download itself: no listing first
            elif job is None:
                job = self.get_job()
            try:
                with self.session(start=True) as conn:
                    report = transfer.download(conn, job.job_dir, server_path, local_path, quiet=quiet)
            except TransferError:
                if named:
                    self.get_job(job.job_name)  # no such job: say so, and which there are
                raise
        report.connections, report.channels = trips.connections, trips.channels
        return report


def _ended_before(ended, cutoff):
    """Did a job that ended at ``ended`` (UTC ISO, as the wrapper records it) end by ``cutoff``?"""
    try:
        # Whole seconds: the wrapper writes nanoseconds where date has them, else none.
        when = datetime.strptime((ended or "")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return False  # no readable end: keep the job
    return when <= cutoff


def _by_start(statuses):
    return sorted(statuses, key=lambda n: (statuses[n].started or "", n))


__all__ = ["STATES", "Job", "JobStatus", "JobsMixin"]
