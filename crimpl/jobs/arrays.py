r"""Job arrays: one script run once per index, for parameter sweeps.

``submit_script(..., array=...)`` takes Slurm's ``--array`` syntax, checked once here
(:func:`parse_array`): a number ``N`` (indexes ``0`` to ``N-1``), or a string of
indexes and ranges, ``"0-99"``, ``"1,3,5-7"``, ``"0-15:4"`` (every 4th), with an
optional ``%M``: at most ``M`` tasks run at a time. Each task sees its index in
``CRIMPL_ARRAY_INDEX`` and writes its own records in the one job directory:
``crimpl-log.<i>``, ``crimpl-status.<i>`` and, once killed, ``crimpl-killed.<i>``
(the names start with ``crimpl-``, which a script or input may never have).
``crimpl-array`` holds the spec, with the limit of tasks at a time, if any.

On Slurm the array is one ``sbatch --array``; on the other kinds the job's wrapper
runs the indexes itself (:mod:`.protocol`). Either way, a job's state comes from its
tasks (:func:`summarize`): complete only when every task completed with exit code 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import JobError
from .protocol import ARRAY, needs_index

#: The most tasks one array may have.
MAX_TASKS = 100_000
#: The largest index (Slurm's own ceiling on ``MaxArraySize`` is 4000001).
MAX_INDEX = 4_000_000
#: Indexes named in messages before "and N more".
SHOWN = 10

_PART = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")


@dataclass(frozen=True)
class ArraySpec:
    """A checked array spec.

    :param indexes: the task indexes, ascending, each once.
    :param text: the indexes in Slurm's syntax, without ``%``.
    :param max_parallel: at most this many tasks at a time (None: the server decides).
    """

    indexes: tuple
    text: str
    max_parallel: int | None = None

    def __str__(self):
        return self.text + (f"%{self.max_parallel}" if self.max_parallel else "")


def _check_max_parallel(value, what="max_parallel"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JobError(f"{what} must be a whole number of tasks, 1 or more, got {value!r}"[:200])
    return value


def parse_array(array, max_parallel: int | None = None) -> ArraySpec:
    """Check an array spec and return it as an :class:`ArraySpec`.

    :param array: a number of tasks ``N`` (indexes ``0`` to ``N-1``) or a string in
        Slurm's syntax: ``"0-99"``, ``"1,3,5-7"``, ``"0-15:4"``, each optionally
        followed by ``%M``. As in Slurm, the string ``"7"`` is the one index 7.
    :param max_parallel: at most this many tasks at a time; with ``%M`` too, the smaller wins.
    :raises JobError: one line saying what is wrong with the spec.
    """
    limit = _check_max_parallel(max_parallel)
    if isinstance(array, int) and not isinstance(array, bool):
        if not 1 <= array <= MAX_TASKS:
            raise JobError(f"array={array} must be a number of tasks from 1 to {MAX_TASKS}")
        return ArraySpec(tuple(range(array)), f"0-{array - 1}" if array > 1 else "0", limit)
    if not isinstance(array, str):
        raise JobError(f"array must be a number of tasks or a string such as '0-99%10', "
                       f"got {type(array).__name__} {array!r}"[:200])
    text = array.strip()
    if not text:
        raise JobError("array is empty: give a number of tasks or indexes such as '0-99' or '1,3,5-7'")
    spec, percent, cap = text.partition("%")
    if percent:
        if not cap.isdigit() or int(cap) < 1:
            raise JobError(f"array {text!r}: the number after % (tasks at a time) must be 1 or more")
        limit = min(int(cap), limit or int(cap))
    indexes = set()
    for part in spec.split(","):
        match = _PART.fullmatch(part.strip())
        if not match:
            raise JobError(f"array {text!r}: {part.strip()!r} is not an index (0 or more), a range "
                           "such as 5-7 or a stepped range such as 0-15:4")
        first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
        if last < first:
            raise JobError(f"array {text!r}: the range {part.strip()} runs backwards: write {last}-{first}")
        if step < 1:
            raise JobError(f"array {text!r}: the step of {part.strip()} must be 1 or more")
        if last > MAX_INDEX:
            raise JobError(f"array {text!r}: index {last} is above the largest, {MAX_INDEX}")
        if (last - first) // step + 1 + len(indexes) > MAX_TASKS:
            raise JobError(f"array {text!r} has more than {MAX_TASKS} tasks: split the sweep")
        indexes.update(range(first, last + 1, step))
    return ArraySpec(tuple(sorted(indexes)), ",".join(p.strip() for p in spec.split(",")), limit)


def read_spec(text: str) -> ArraySpec | None:
    """The spec ``crimpl-array`` holds, or None if it is not one crimpl wrote."""
    try:
        return parse_array(text.strip())
    except JobError:
        return None


def _indexes(indexes) -> str:
    shown = ", ".join(str(i) for i in indexes[:SHOWN])
    more = f" and {len(indexes) - SHOWN} more" if len(indexes) > SHOWN else ""
    return f"task{'s' if len(indexes) > 1 else ''} {shown}{more}"


def _problems(tasks) -> str:
    """What went wrong in the tasks that ended without completing, one phrase per kind."""
    phrases = []
    failed = [i for i, s in tasks.items() if s.state == "failed"]
    if failed:
        # Each one's exit code, else why it failed without one (Slurm's "walltime exceeded").
        why = [None if tasks[i].exit_code is None else str(tasks[i].exit_code) for i in failed[:SHOWN]]
        if all(why):
            reasons = "exit " + ", ".join(why)
        else:
            reasons = ", ".join(f"exit {w}" if w else tasks[i].detail or "no exit code"
                                for i, w in zip(failed, why))
        phrases.append(f"{_indexes(failed)} failed ({reasons}{', ...' if len(failed) > SHOWN else ''})")
    for state, words in (("killed", "killed"), ("preempted", "preempted"), ("unknown", "unreadable"),
                         ("not-submitted", "never started")):
        which = [i for i, s in tasks.items() if s.state == state]
        if which:
            phrases.append(f"{_indexes(which)} {words}")
    return "; ".join(phrases)


def summarize(tasks: dict, *, killed: bool = False, runner_alive: bool = False):
    """Return an array job's :class:`~crimpl.jobs.JobStatus` from its tasks' statuses.

    It runs while a task runs or waits; once every task ended, it is ``killed`` if the
    array was killed, ``complete`` if every task completed, else ``failed``, its detail
    naming the indexes (``tasks 3, 7 failed (exit 1, 2)``). Its ``tasks`` are ``tasks``.

    :param tasks: ``{index: JobStatus}`` of every index of the array.
    :param killed: the whole array was killed.
    :param runner_alive: crimpl's runner of the array still runs (it starts the tasks
        that wait): the job is running, not pending.
    """
    from .api import JobStatus

    states = [s.state for s in tasks.values()]
    started = min((s.started for s in tasks.values() if s.started), default=None)
    ended = max((s.ended for s in tasks.values() if s.ended), default=None)
    waiting = states.count("pending")
    live = states.count("running")
    if live or waiting or runner_alive:
        done = len(states) - live - waiting
        failed = sum(1 for s in states if s in ("failed", "preempted", "unknown"))
        progress = (f"{done}/{len(states)} done" + (f", {failed} failed" if failed else "")
                    + (f", {states.count('killed')} killed" if "killed" in states else ""))
        state = "running" if live or done or runner_alive else "pending"
        return JobStatus(state, started=started, detail=progress, tasks=tasks)
    if killed:
        return JobStatus("killed", started=started, ended=ended, tasks=tasks,
                         detail=f"the array was killed; {states.count('complete')}/{len(states)} complete")
    if all(s.state == "complete" and s.exit_code == 0 for s in tasks.values()):
        return JobStatus("complete", exit_code=0, started=started, ended=ended, tasks=tasks,
                         detail=f"{len(states)}/{len(states)} complete")
    return JobStatus("failed", started=started, ended=ended, tasks=tasks, detail=_problems(tasks))


def local_status(fields: dict):
    """Return the :class:`~crimpl.jobs.JobStatus` of a job from the fields its listing gave.

    A job that is no array has its own record (``fields``). An array run by crimpl's
    runner (every kind but Slurm) also has ``array`` (its spec), ``tasks`` (``{index:
    fields}`` of the tasks that started) and ``killed_tasks``; a task that has not
    started waits while the runner runs, and never will once it ended.
    """
    from .api import JobStatus

    fields = dict(fields)
    spec, recorded = fields.pop("array", None), fields.pop("tasks", None)
    killed_tasks = fields.pop("killed_tasks", set())
    killed = fields.pop("killed", False)
    if spec is None:
        return JobStatus(**fields)
    parsed = read_spec(spec)
    if parsed is None:
        return JobStatus("unknown", detail=f"unreadable {ARRAY}: {spec[:60]!r}")
    if fields["state"] == "not-submitted" and not recorded:
        # Uploaded, never started; on Slurm, the scheduler's states decide (crimpl.slurm).
        return JobStatus(**fields, tasks={i: JobStatus("not-submitted") for i in parsed.indexes})
    runner_alive = fields["state"] == "running"
    tasks = {}
    for index in parsed.indexes:
        if index in recorded:
            tasks[index] = JobStatus(**recorded[index])
        elif index in killed_tasks or killed:
            tasks[index] = JobStatus("killed", detail="killed before it started")
        elif runner_alive:
            at_most = f" (at most {parsed.max_parallel} at a time)" if parsed.max_parallel else ""
            tasks[index] = JobStatus("pending", detail=f"waits for a free slot{at_most}")
        elif fields["state"] == "not-submitted":
            tasks[index] = JobStatus("not-submitted")
        else:
            tasks[index] = JobStatus("failed", detail="never started: the array's runner ended first")
    return summarize(tasks, killed=killed, runner_alive=runner_alive)


def task_of(status, job_name: str, index) -> None:
    """Raise :class:`JobError` unless ``index`` is a task of the job whose status is ``status``."""
    if status is None or status.tasks is None:
        raise JobError(f"job {job_name} is not an array: leave out the index")
    if isinstance(index, bool) or not isinstance(index, int) or index not in status.tasks:
        indexes = sorted(status.tasks)
        raise JobError(f"job {job_name} has no task {index!r}: its indexes are "
                       f"{_compact(indexes)}")


def _compact(indexes) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``."""
    parts, start = [], None
    for position, index in enumerate(indexes):
        if start is None:
            start = index
        if position + 1 == len(indexes) or indexes[position + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def which_index(job_name: str, tasks: dict) -> JobError:
    """The error for a look at one log of an array without saying which task."""
    return needs_index(job_name, _compact(sorted(tasks)))


def check_index(status, job_name: str, index) -> None:
    """Raise :class:`JobError` unless ``index`` names a task of an array job, or is None for another job."""
    if index is not None:
        task_of(status, job_name, index)
    elif status is not None and status.tasks is not None:
        raise which_index(job_name, status.tasks)


def submitted_spec(array, max_parallel, retry_on_preemption: int = 0) -> ArraySpec | None:
    """The checked spec of a submit's ``array=`` and ``max_parallel=`` (None: no array)."""
    if array is None:
        if max_parallel is not None:
            raise JobError("max_parallel limits the tasks of an array: pass array= too")
        return None
    if retry_on_preemption:
        raise JobError("retry_on_preemption does not apply to an array: leave it out, "
                       "and resubmit the array if a preemption ended it")
    return parse_array(array, max_parallel)
