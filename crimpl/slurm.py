r"""A Slurm cluster's login node as a crimpl server (:class:`RemoteSlurmServer`).

Everything of :class:`~crimpl.sshhost.RemoteThreadServer` (OpenSSH config,
known_hosts, the job directory and its files) holds; what differs is who runs
the job. crimpl writes a batch script, ``crimpl-sbatch.sh``, whose ``#SBATCH``
lines carry the job's options and whose body runs crimpl's wrapper (so
``crimpl-status`` still records the script's exit code, which the batch script
then exits with), and submits it with ``sbatch --parsable``. The Slurm job id is
kept in ``crimpl-slurm-id``; Slurm's own output goes to ``crimpl-slurm.out``.

A job's state comes from Slurm first: ``squeue`` (which also shows the jobs that
ended a few minutes ago, as ``scontrol show job`` does, while slurmctld keeps
them: ``MinJobAge``), then ``sacct`` where accounting is on, and, once Slurm has
forgotten the job, its ``crimpl-status`` record. Slurm's states map to crimpl's
in :func:`slurm_status`.
"""

from __future__ import annotations

import os
import re
import shlex
import threading

from .errors import JobError
from .jobs import Job, JobStatus, arrays, protocol
from .jobs.protocol import (COMMANDS_SCRIPT, KILLED, LOG, STATUS, WRAPPER, _checked, check_job_name, job_dir,
                            new_job_name, rotate_logs, run, task_suffix)
from .sshhost import RemoteThreadServer

BATCH = "crimpl-sbatch.sh"
SLURM_ID = "crimpl-slurm-id"
SLURM_OUT = "crimpl-slurm.out"

#: Slurm states of a job that waits for resources.
PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
#: Slurm states of a job that holds its resources.
RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}
#: Slurm states of a job that ended without completing, and how crimpl says why.
FAILED = {"FAILED": "Slurm: FAILED", "OUT_OF_MEMORY": "Slurm: OUT_OF_MEMORY (out of memory)",
          "NODE_FAIL": "Slurm: NODE_FAIL (its node failed)",
          "BOOT_FAIL": "Slurm: BOOT_FAIL (its node did not boot)",
          "DEADLINE": "Slurm: DEADLINE (its deadline passed)", "PREEMPTED": "Slurm: PREEMPTED",
          "TIMEOUT": "walltime exceeded"}

# Prints one line per job with a Slurm id (``I <name> <id> <killed|->``), then what squeue
# (``Q id|state|reason``) and sacct (``A id|state|exit``) say about those ids.
_SLURM_STATE_SCRIPT = r"""
ids=
for d in {dirs}; do
  d=${{d%/}}
  [ -s "$d/{slurm_id}" ] || continue
  id=$(head -c 64 "$d/{slurm_id}" | tr -dc '0-9_')
  if [ -e "$d/{killed}" ]; then k=killed; else k=-; fi
  printf 'I\t%s\t%s\t%s\n' "${{d##*/}}" "$id" "$k"
  ids="$ids${{ids:+,}}$id"
done
[ -n "$ids" ] || exit 0
# -r: one line per array task (<id>_<index>), pending ones too.
squeue -h -r -t all -u "$(id -un)" -o '%i|%T|%r' 2> /dev/null | sed 's/^/Q\t/'
# No accounting (sacct then fails): slurmctld's memory and the status record tell.
sacct -n -P -X -j "$ids" -o JobID,State,ExitCode 2> /dev/null | sed 's/^/A\t/'
exit 0
"""

# Submits the batch script of a job whose files are uploaded; prints ``submitted <id>``,
# ``refused <sbatch's message>`` or why it did not try (as protocol.start does).
_SUBMIT_SCRIPT = r"""
cd {job_dir} 2> /dev/null || {{ echo missing; exit 0; }}
[ -f {wrapper} ] || {{ echo missing; exit 0; }}
live() {{ squeue -h -r -j "$(cat {slurm_id})" -o %T 2> /dev/null | grep -qxE '{live}'; }}
if [ {again} = no ] && [ -e {slurm_id} ]; then echo exists; exit 0; fi
if [ {again} = yes ] && [ -s {slurm_id} ] && live; then echo running; exit 0; fi
{write_batch}
[ -f {batch} ] || {{ echo missing; exit 0; }}
rm -rf ./.crimpl-upload-*
rm -f {status} {killed} {slurm_id} {slurm_out} {status}.[0-9]* {killed}.[0-9]* {slurm_out}.[0-9]*
{rotate_logs}if out=$(sbatch --parsable {batch} 2> .crimpl-sbatch.err); then
  id=$(printf '%s\n' "$out" | tail -n 1); id=${{id%%;*}}
  printf '%s\n' "$id" > {slurm_id}.tmp && mv -f {slurm_id}.tmp {slurm_id}
  rm -f .crimpl-sbatch.err
  printf 'submitted\t%s\n' "$id"
else
  why=$(tr '\n' ' ' < .crimpl-sbatch.err)
  # A new job sbatch refused leaves nothing behind.
  if [ {again} = no ]; then cd .. && rm -rf -- {name}; else rm -f .crimpl-sbatch.err; fi
  printf 'refused\t%s\n' "$why"
fi
"""

# {task}: empty for the whole job (every task of an array), else "_<index>" for one task.
_KILL_SCRIPT = r"""
cd {job_dir} 2> /dev/null || {{ echo not-running; exit 0; }}
id=$(cat {slurm_id} 2> /dev/null){task}
if squeue -h -r -j "$id" -o %T 2> /dev/null | grep -qxE '{live}'; then
  touch {killed}{suffix}; scancel "$id" && echo killed
else
  echo not-running
fi
"""

# Follows the log while Slurm says the job lives (its compute node may be another machine,
# so the wrapper's pid says nothing here), then prints what is left.
_FOLLOW_SCRIPT = r"""
cd {job_dir} || exit 3
id=$(cat {slurm_id} 2> /dev/null){task}
live='squeue -h -r -j "$1" -o %T 2> /dev/null | grep -qxE "{live}"'
watch="while $live; do sleep 1; done"
if [ -n "$id" ] && sh -c "$live" sh "$id"; then
  # The wrapper truncates the log when it starts: an empty one is all tail needs meanwhile.
  [ -e {log} ] || : > {log}
  # tail follows until the watcher ends. Started from a subshell, it is not tail's child:
  # it is reaped when it ends, not left a zombie that tail would take for alive.
  watcher=$(sh -c "$watch" sh "$id" > /dev/null 2>&1 & echo $!)
  exec tail -c +{start} -s 0.5 -F --pid="$watcher" {log}
fi
[ -e {log} ] || exit 0
exec tail -c +{start} {log}
"""

#: The batch script: crimpl's wrapper records the exit code, which the job then exits with.
_BATCH_TEMPLATE = """#!/bin/sh
{sbatch_lines}
# Generated by crimpl: runs crimpl's wrapper, which records the script's exit code in {status}.
sh ./{wrapper}{task}
code=$(sed -n 's/.*"exit_code": *\\([0-9][0-9]*\\).*/\\1/p' {status})
exit "${{code:-1}}"
"""

_LIVE = "|".join(sorted(PENDING | RUNNING))


def slurm_status(record: JobStatus, slurm_state: str | None, reason: str = "",
                 job_id: str = "", killed: bool = False) -> JobStatus:
    """Return a Slurm job's :class:`JobStatus` from what Slurm and its status record say.

    :param record: what ``crimpl-status`` says (as the other server kinds read it).
    :param slurm_state: Slurm's state (``squeue``/``sacct``), or None once Slurm forgot the job.
    :param reason: Slurm's reason (``squeue``'s ``%r``), for a pending job.
    :param job_id: the Slurm job id, for messages.
    :param killed: ``crimpl-killed`` exists: crimpl cancelled the job.
    """
    times = {"started": record.started, "ended": record.ended, "on_complete": None}
    state = (slurm_state or "").split()[0].rstrip("+") if slurm_state else None
    if state in PENDING:
        why = f" ({reason})" if reason and reason != "None" else ""
        return JobStatus("pending", detail=f"Slurm job {job_id} {state.lower()}{why}")
    if state in RUNNING:
        return JobStatus("running", **{**times, "ended": None})
    if state == "CANCELLED":
        return JobStatus("killed", exit_code=record.exit_code, **times, detail=f"Slurm job {job_id} cancelled")
    if state == "COMPLETED":
        if record.state == "complete" and record.exit_code == 0:
            return record
        return JobStatus("failed", exit_code=record.exit_code, **times,
                         detail=f"Slurm job {job_id} completed but crimpl-status says {record}")
    if state in FAILED:
        return JobStatus("failed", exit_code=record.exit_code, **times, detail=FAILED[state])
    if state is not None:
        return JobStatus("failed", exit_code=record.exit_code, **times, detail=f"Slurm: {state}")
    # Slurm forgot the job: its own record decides, if it wrote an end.
    if record.state in ("complete", "failed", "killed") and record.ended:
        return record
    if killed:
        return JobStatus("killed", exit_code=record.exit_code, **times, detail=f"Slurm job {job_id} cancelled")
    return JobStatus("failed", exit_code=record.exit_code, **times,
                     detail=f"Slurm no longer knows job {job_id} and it recorded no end")


def _array_ids(job_id: str) -> list:
    """The ids a line of squeue or sacct speaks for: ``123_[4-6%2]`` (array tasks that
    wait, on one line) is ``123_4``, ``123_5`` and ``123_6``."""
    match = re.fullmatch(r"(\d+)_\[(.+)\]", job_id)
    spec = match and arrays.read_spec(match[2])
    return [f"{match[1]}_{index}" for index in spec.indexes] if spec else [job_id]


def _slurm_job(record: JobStatus, job_id: str, queue: dict, accounting: dict, killed: bool) -> JobStatus:
    """The status of Slurm job (or array task) ``job_id`` from squeue's, sacct's and its own record."""
    state, reason = queue.get(job_id) or accounting.get(job_id) or (None, "")
    if state and state not in PENDING | RUNNING and job_id in accounting:
        state = accounting[job_id][0]  # accounting keeps the final word
    return slurm_status(record, state, reason, job_id, killed=killed)


def _sbatch_lines(name, nprocs, walltime, mail_type, mail_user, slurm, spec=None):
    """The ``#SBATCH`` lines of a job (an array's, with ``spec``); raise JobError for an option
    that cannot be one."""
    options = [f"--job-name={name}"]
    if spec is None:
        options.append(f"--output={SLURM_OUT}")
    else:
        options += [f"--array={spec}", f"--output={SLURM_OUT}.%a"]
    if nprocs is not None:
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise JobError(f"nprocs must be a whole number of processors, 1 or more, got {nprocs!r}")
        options.append(f"--ntasks={nprocs}")
    for param, flag, value in (("walltime", "--time", walltime), ("mail_type", "--mail-type", mail_type),
                               ("mail_user", "--mail-user", mail_user)):
        if value is not None:
            if not isinstance(value, str) or not re.fullmatch(r"[\w:.@+,=/-]+", value):
                raise JobError(f"{param} must be one word as sbatch takes it, got {value!r}"[:200])
            options.append(f"{flag}={value}")
    if isinstance(slurm, str):
        slurm = [slurm]
    for option in slurm or []:
        if not isinstance(option, str) or not option.startswith("-") or "\n" in option or "\r" in option:
            raise JobError(f"each slurm option must be one sbatch option such as '--partition=short', "
                           f"got {option!r}"[:200])
        options.append(option)
    return "\n".join(f"#SBATCH {option}" for option in options)


class RemoteSlurmServer(RemoteThreadServer):
    """A Slurm cluster's login node as a crimpl server: jobs go through ``sbatch``.

    :param host: the login node: an OpenSSH alias (``hpc``) or ``user@host[:port]``.
    :param directory: crimpl's folder there, on a file system the compute nodes share
        (created if missing; ``~/`` is the login home).
    :param ssh_config: the OpenSSH config file to honour; default ``$CRIMPL_SSH_CONFIG``,
        else ``~/.ssh/config``.
    :param host_key_policy: ``strict`` (default) or ``accept-new``, as for
        :class:`~crimpl.sshhost.RemoteThreadServer`.
    """

    kind = "slurm"

    def __init__(self, host: str, directory: str = "~/crimpl", *, ssh_config: str | None = None,
                 host_key_policy: str = "strict") -> None:
        super().__init__(host, directory, ssh_config=ssh_config, host_key_policy=host_key_policy)
        # The batch script of the submit under way in this thread, for _start.
        self._submitting = threading.local()

    def __str__(self):
        return f"Slurm login node {self.host}"

    def submit_script(self, script, files=None, *, nprocs: int | None = None, walltime: str | None = None,
                      mail_type: str | None = None, mail_user: str | None = None, slurm=None,
                      job_name: str | None = None, on_complete: str | None = None,
                      allow_concurrent: bool = True, quiet: bool = False, array=None,
                      max_parallel: int | None = None) -> Job:
        """Send ``script`` and ``files`` to the cluster and submit them with ``sbatch``.

        :param nprocs: tasks (``--ntasks``).
        :param walltime: time limit as sbatch takes it (``--time``), e.g. ``"02:00:00"``.
        :param mail_type: when Slurm mails (``--mail-type``), e.g. ``"END"``.
        :param mail_user: who it mails (``--mail-user``).
        :param slurm: further sbatch options, e.g. ``["--partition=short"]``.
        :param allow_concurrent: a cluster runs many jobs at once (default True).
        :param array: one ``sbatch --array`` (a number of tasks, or Slurm's syntax such as
            ``"0-99%10"``); each task runs crimpl's wrapper with ``CRIMPL_ARRAY_INDEX``
            (``$SLURM_ARRAY_TASK_ID``) and writes its own records (:mod:`crimpl.jobs.arrays`).
        :param max_parallel: at most this many tasks at a time (Slurm's ``%``); default: as
            many as Slurm gives.
        :returns: the :class:`~crimpl.jobs.Job`, pending or running.
        :raises JobError: if sbatch refuses the job (its message is in the error;
            nothing of the job is left on the cluster), or for an option that is not one.

        The other parameters are those of :meth:`crimpl.jobs.JobsMixin.submit_script`.
        """
        if job_name is not None:
            check_job_name(job_name)
        # The name is fixed here, so that the batch script can carry it.
        if isinstance(script, (list, tuple)):
            entry = COMMANDS_SCRIPT
        else:
            entry = os.path.basename(os.fspath(script)) if isinstance(script, (str, os.PathLike)) else "job"
        name = job_name or new_job_name(entry)
        spec = arrays.submitted_spec(array, max_parallel)
        task = "" if spec is None else ' --task "$SLURM_ARRAY_TASK_ID"'
        self._submitting.batch = _BATCH_TEMPLATE.format(
            sbatch_lines=_sbatch_lines(name, nprocs, walltime, mail_type, mail_user, slurm, spec),
            status=STATUS if spec is None else f'{STATUS}."$SLURM_ARRAY_TASK_ID"', wrapper=WRAPPER, task=task)
        try:
            return super().submit_script(script, files, job_name=name, on_complete=on_complete,
                                         allow_concurrent=allow_concurrent, quiet=quiet, array=array,
                                         max_parallel=max_parallel)
        finally:
            self._submitting.batch = None

    # -- the hooks of crimpl.jobs ----------------------------------------------------

    def _start(self, conn, name, *, again, allow_concurrent):
        batch = getattr(self._submitting, "batch", None)
        write = f"cat > {BATCH} <<'CRIMPL_BATCH_END'\n{batch}CRIMPL_BATCH_END" if batch and not again else ""
        script = _SUBMIT_SCRIPT.format(
            job_dir=shlex.quote(job_dir(self.job_root, name)), name=shlex.quote(name), wrapper=WRAPPER,
            slurm_id=SLURM_ID, slurm_out=SLURM_OUT, batch=BATCH, status=STATUS, killed=KILLED,
            again="yes" if again else "no", live=_LIVE, write_batch=write, rotate_logs=rotate_logs(again))
        result = _checked(run(conn, script), f"submitting job {name} to Slurm")
        outcome, _, detail = (result.stdout.strip().splitlines() or [""])[-1].partition("\t")
        if outcome == "submitted":
            return
        if outcome == "refused":
            raise JobError(f"sbatch refused job {name}: {detail.strip() or 'no message'} "
                           "(nothing was submitted)")
        if outcome == "exists":
            raise self._exists(name)
        if outcome == "running":
            raise JobError(f"job {name} is still queued or running: kill it before resubmitting")
        if outcome == "missing":
            raise self._never_uploaded(name)
        raise JobError(f"submitting job {name} to Slurm gave an unexpected answer: {outcome!r}")

    def _read_statuses(self, conn, names=None) -> dict:
        if names is None:
            dirs = f"{shlex.quote(self.job_root.rstrip('/') + '/jobs')}/*/"
        else:
            dirs = " ".join(shlex.quote(job_dir(self.job_root, n)) for n in names)
        # Slurm first, the records second: a job Slurm says ended wrote its record before it ended.
        result = run(conn, _SLURM_STATE_SCRIPT.format(dirs=dirs, slurm_id=SLURM_ID, killed=KILLED))
        records = super()._read_statuses(conn, names)
        ids, killed, queue, accounting = {}, set(), {}, {}
        for line in result.stdout.splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "I":
                job, job_id, flag = (rest.split("\t") + ["", ""])[:3]
                ids[job] = job_id
                if flag == "killed":
                    killed.add(job)
            elif kind in ("Q", "A"):
                job_id, _, rest = rest.partition("|")
                state, _, extra = rest.partition("|")
                for one in _array_ids(job_id):
                    (queue if kind == "Q" else accounting)[one] = (state, extra)
        statuses = {}
        for job, record in records.items():
            job_id = ids.get(job)
            if job_id is None:
                statuses[job] = record  # not submitted to Slurm (yet): the record says it
                continue
            if record.tasks is None:
                statuses[job] = _slurm_job(record, job_id, queue, accounting, job in killed)
                continue
            # An array: each task is <id>_<index> to Slurm.
            tasks = {index: _slurm_job(task, f"{job_id}_{index}", queue, accounting,
                                       job in killed or task.state == "killed")
                     for index, task in record.tasks.items()}
            statuses[job] = arrays.summarize(tasks, killed=job in killed)
        return statuses

    def _kill(self, conn, name, index=None) -> bool:
        # One task is <id>_<index> to Slurm; the whole job's id cancels every task of an array.
        script = _KILL_SCRIPT.format(job_dir=shlex.quote(job_dir(self.job_root, name)), slurm_id=SLURM_ID,
                                     killed=KILLED, live=_LIVE, task="" if index is None else f"_{int(index)}",
                                     suffix=task_suffix(index))
        what = f"cancelling task {index} of job {name}" if index is not None else f"cancelling job {name}"
        result = _checked(run(conn, script), what)
        return result.stdout.strip().endswith("killed")

    def _stream_log(self, conn, name, offset, index=None):
        script = _FOLLOW_SCRIPT.format(job_dir=shlex.quote(job_dir(self.job_root, name)), slurm_id=SLURM_ID,
                                       log=LOG + task_suffix(index), start=offset + 1, live=_LIVE,
                                       task="" if index is None else f"_{int(index)}")
        return protocol.stream_log(conn, self.job_root, name, offset=offset, script=script)
