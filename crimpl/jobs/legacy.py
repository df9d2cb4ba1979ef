"""The names of crimpl's earlier releases, as thin aliases of the job API.

Scripts written for the old crimpl (and tools built on it, such as PHOEBE's remote
computations) call ``server.create_job``, ``server.submit_job``, ``server.existing_jobs``,
``job.submit_script``, ``job.wait_for_job_status``, ``job.kill_job`` and
``job.resubmit_script``. :class:`LegacyServerNames` (mixed into every server kind through
:class:`~crimpl.jobs.JobsMixin`) and :class:`LegacyJobNames` (mixed into
:class:`~crimpl.jobs.Job`) accept those names and hand each call to the current API:
one implementation, two spellings. ``load_server``, ``list_servers`` and ``save`` keep
their names in :mod:`crimpl.sshhost`.

What the old releases did and these do not: conda environments (``conda_env``,
``isolate_env``), ``ignore_files`` and ``trial_run`` are refused with a one-line error;
the Slurm options ``walltime`` and ``mail_type`` default to the cluster's own defaults
rather than the old ``2-00:00:00`` and ``END,FAIL``.
"""

import inspect
import time

from ..errors import JobError, JobUnreachableError
from .protocol import STATES, check_job_name, new_job_name

#: Old names of states, and the state each is today (a cancelled job reads ``killed``).
OLD_STATES = {"canceled": "killed", "cancelled": "killed"}
#: States a job does not leave by waiting.
ENDED = ("complete", "failed", "killed")
#: What the old releases took and this one has no counterpart for, and what to do instead.
DROPPED = {
    "conda_env": "activate the environment in the script",
    "isolate_env": "create the environment in the script",
    "ignore_files": "pass only the files to send",
    "trial_run": "read the script instead",
}
#: Slurm options of the old ``submit_script``; a server kind without a scheduler refuses them.
SLURM_OPTIONS = ("walltime", "mail_type", "mail_user", "addl_slurm_kwargs")
#: Consecutive ``unknown`` reads after which a wait on a live state gives up.
MAX_UNKNOWN = 5


def _refuse_dropped(options):
    for name, value in options.items():
        if name not in DROPPED:
            raise JobError(f"unknown option {name}: see help(crimpl.Job.submit_script) for what it takes")
        if value not in (None, False, [], ()):
            raise JobError(f"{name} is no longer part of crimpl: {DROPPED[name]}")


def _states(value, what):
    """Return the set of current state names ``value`` (a name or a list of names) means."""
    names = [value] if isinstance(value, str) else list(value or [])
    states = set()
    for name in names:
        state = OLD_STATES.get(name, name)
        if state not in STATES:
            raise JobError(f"{what} {name!r} is not a job state; states: {', '.join(STATES)}")
        states.add(state)
    return states


class LegacyServerNames:
    """``create_job``, ``submit_job``, ``existing_jobs`` and ``existing_jobs_status``, as in the
    old crimpl, on every server kind."""

    def create_job(self, job_name: str | None = None, nprocs: int | None = None, **dropped):
        """Return a job that is not submitted yet; its ``submit_script`` sends the script.

        :param job_name: its name (default: a new one from the time).
        :param nprocs: processors for a Slurm job (``--ntasks``); a server without a
            scheduler gives a job the whole machine and ignores it.
        :param dropped: ``conda_env`` and ``isolate_env`` are refused (no conda any more).
        :returns: a :class:`~crimpl.jobs.Job` in state ``not-submitted``.
        :raises JobError: if the name is not valid, or a dropped option is given.
        """
        from .api import Job

        _refuse_dropped(dropped)
        if job_name is not None:
            check_job_name(job_name)
        job = Job(self, job_name or new_job_name("job"))
        job.legacy_options = {"nprocs": nprocs}
        return job

    def submit_job(self, script, files=None, job_name: str | None = None, nprocs: int | None = None,
                   walltime: str | None = None, mail_type: str | None = None, mail_user: str | None = None,
                   addl_slurm_kwargs: dict | None = None, wait_for_job_status=False, **dropped):
        """:meth:`create_job` followed by the job's ``submit_script``; returns the job.

        See :meth:`LegacyJobNames.submit_script` for the arguments.
        """
        job = self.create_job(job_name=job_name, nprocs=nprocs,
                              **{k: dropped.pop(k) for k in ("conda_env", "isolate_env") if k in dropped})
        return job.submit_script(script, files, walltime=walltime, mail_type=mail_type, mail_user=mail_user,
                                 addl_slurm_kwargs=addl_slurm_kwargs, wait_for_job_status=wait_for_job_status,
                                 **dropped)

    @property
    def existing_jobs(self) -> list:
        """The names of the jobs on the server, oldest first (:meth:`job_statuses`)."""
        return list(self.job_statuses())

    @property
    def existing_jobs_status(self) -> dict:
        """``{job_name: state}`` of every job on the server, oldest first."""
        return {name: status.state for name, status in self.job_statuses().items()}


class LegacyJobNames:
    """``submit_script``, ``wait_for_job_status``, ``kill_job`` and ``resubmit_script``, as in
    the old crimpl, on every :class:`~crimpl.jobs.Job`."""

    def submit_script(self, script, files=None, nprocs: int | None = None, walltime: str | None = None,
                      mail_type: str | None = None, mail_user: str | None = None,
                      addl_slurm_kwargs: dict | None = None, wait_for_job_status=False, **dropped):
        """Send ``script`` and ``files`` and start this job (one made by ``create_job``).

        The server's own ``submit_script`` does the work, under this job's name.

        :param nprocs: processors for a Slurm job (default: the ``create_job`` value);
            ignored where there is no scheduler.
        :param walltime: Slurm ``--time`` (default: the cluster's).
        :param mail_type: Slurm ``--mail-type``.
        :param mail_user: Slurm ``--mail-user``.
        :param addl_slurm_kwargs: further sbatch options, ``{"partition": "short"}`` for
            ``--partition=short``.
        :param wait_for_job_status: a state to wait for (:meth:`wait_for_job_status`), or False.
        :returns: this job, submitted.
        :raises JobError: for a dropped option (``ignore_files``, ``trial_run``), a Slurm
            option on a server without Slurm, or anything the server's submit refuses.
        """
        _refuse_dropped(dropped)
        options = dict(getattr(self, "legacy_options", {}))
        if nprocs is not None:
            options["nprocs"] = nprocs
        slurm = {"walltime": walltime, "mail_type": mail_type, "mail_user": mail_user}
        if addl_slurm_kwargs:
            if not isinstance(addl_slurm_kwargs, dict):
                raise JobError("addl_slurm_kwargs must be a dict of sbatch options, e.g. {'partition': 'short'}")
            slurm["slurm"] = [f"--{key}={value}" for key, value in addl_slurm_kwargs.items()]
        accepted = inspect.signature(self.server.submit_script).parameters
        for name, value in slurm.items():
            if value is not None and name not in accepted:
                raise JobError(f"{name if name != 'slurm' else 'addl_slurm_kwargs'} needs a Slurm server "
                               f"(crimpl.RemoteSlurmServer); {self.server} has no scheduler")
        options.update({k: v for k, v in slurm.items() if v is not None})
        # Only a scheduler allots processors: elsewhere the job has the whole machine.
        options = {k: v for k, v in options.items() if k in accepted and v is not None}
        submitted = self.server.submit_script(script, files, job_name=self.job_name, **options)
        self._sources = submitted._sources
        self.upload_report = submitted.upload_report
        self.last_status = None
        if wait_for_job_status:
            self.wait_for_job_status("complete" if wait_for_job_status is True else wait_for_job_status)
        return self

    def wait_for_job_status(self, status="complete", error_if=("failed", "canceled"), sleeptime: float = 5,
                            timeout: float | None = None) -> str:
        """Poll until the job's state is ``status`` and return that state.

        :param status: a state or a list of states to wait for (``canceled`` means ``killed``).
        :param error_if: states that end the wait with an error instead.
        :param sleeptime: seconds between two looks.
        :param timeout: seconds to wait at most (default: no limit while the server answers).
        :raises JobError: if the job reaches a state of ``error_if``, ends in a state that is
            not ``status`` (it will never get there), was never submitted, or ``timeout`` passes.
        :raises JobUnreachableError: if the server stops, goes away or stays unreachable.
        """
        wanted = _states(status, "status")
        errors = _states(error_if, "error_if") - wanted
        deadline = None if timeout is None else time.monotonic() + timeout
        unknown = 0
        while True:
            if wanted <= set(ENDED):
                # Only end states wanted: the bounded wait of the current API.
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                current = self.wait(timeout=remaining, interval=sleeptime)
            else:
                current = self.status()
            state = current.state
            if state in wanted:
                return state
            if state in errors:
                raise JobError(f"job {self.job_name} is {current} (error_if={sorted(errors)})")
            if state in ENDED or state == "not-submitted":
                advice = "submit it first" if state == "not-submitted" else "resubmit it to run it again"
                raise JobError(f"job {self.job_name} is {current} and will never be "
                               f"{' or '.join(sorted(wanted))}: {advice}")
            unknown = unknown + 1 if state == "unknown" else 0
            if unknown >= MAX_UNKNOWN:
                raise JobUnreachableError(f"job {self.job_name} read unknown {unknown} times in a row "
                                          f"({current.detail}): check {self.server}", current)
            if deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {self.job_name} still {state} after {timeout:.0f} s")
            time.sleep(sleeptime)

    def kill_job(self) -> bool:
        """End the job (:meth:`~crimpl.jobs.Job.kill`); True if it was running."""
        return self.kill()

    def resubmit_script(self):
        """Run the job again in place (:meth:`~crimpl.jobs.Job.resubmit`); returns the job."""
        return self.resubmit()


__all__ = ["LegacyJobNames", "LegacyServerNames"]
