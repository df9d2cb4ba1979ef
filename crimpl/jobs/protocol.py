r"""The job protocol on the server: the files of a job, the shell that runs it, and what it prints.

What a job is lives on the server, not in a Python object, so any process can
find it again. Every command below is POSIX ``sh`` run over the job's one SSH
connection (or by ``/bin/sh`` for the local target); it needs GNU ``tail``
(``--pid``) and ``setsid`` (else ``python3``). Each job has a directory
``<remote_dir>/jobs/<job_name>/`` (``remote_dir`` is ``crimpl`` under the login
home on EC2, and ``$CRIMPL_HOME/local`` for the local target) holding:

``<script>``
    the user's script (its own name, or ``crimpl-script.sh`` for a list of
    commands) and every input file or directory beside it, under the name it
    has in the job directory (the basename of the path given, not of a symlink's
    target). Names starting with ``crimpl-`` or ``.crimpl-`` belong to crimpl,
    and a script's name may not start with ``-`` (see :func:`reserved_name`);
``crimpl-job.sh``
    the wrapper that runs the script; it is started in its own session
    (``setsid``), so it survives the SSH connection dropping and the local
    process exiting, and its process id is the job's process group;
``crimpl-log``
    the script's stdout and stderr, interleaved (``crimpl-log.previous``: the
    log of the run before a resubmit);
``crimpl-status``
    one JSON line: ``state`` (running, complete, failed, killed, preempted), ``exit_code``,
    ``pid`` (the wrapper's), ``boot_id`` (``/proc/sys/kernel/random/boot_id``)
    and ``pid_start`` (field 22 of ``/proc/<pid>/stat``, the process start
    time) where ``/proc`` has them, else empty, ``started``, ``ended`` (UTC ISO
    times) and ``on_complete``. The wrapper rewrites it atomically (write then
    rename). ``complete`` is written only for exit code 0; any other exit is
    ``failed``. No status file: uploaded, never started;
``crimpl-killed``
    present once the job was killed;
``crimpl-array``, ``crimpl-log.<i>``, ``crimpl-status.<i>``, ``crimpl-killed.<i>``
    of an array job (:mod:`.arrays`): its spec, and each task's log, status record
    and kill mark. The wrapper is then the array's *runner*: it starts
    ``crimpl-job.sh --task <i>`` for each index in a session of its own (so that one
    task can be killed alone), at most the spec's ``%`` (else ``nproc``) at a time,
    and records its own state in ``crimpl-status`` once every task ended. A task
    marked killed (or of an array marked killed) records ``killed`` and never runs.

A job is *alive* only while its recorded pid runs AND, where ``/proc`` tells,
the boot id and the process start time are the recorded ones: after a reboot the
pid may belong to an unrelated process, which is then never called the job nor
killed (:data:`_FUNCTIONS`, the one place that reads a pid). A ``running`` record
whose process is not alive reads as ``failed`` with no exit code. With
``on_complete`` set, the wrapper runs the server's shutdown command after the
script ended (unless it was killed), and the instance's shutdown behaviour
decides stop or terminate.

Starting a job is atomic: :data:`_START_SCRIPT` holds ``jobs/.crimpl-lock`` (a
directory, made with ``mkdir``, holding the holder's pid so that the lock of a
killed submit is broken) while it checks that the job was never started and that
no other job is running, starts the wrapper and waits for its first status
record. It prints one line: ``started`` then the record, or the reason it did
not start (``exists``, ``busy <job>``, ``running``, ``missing``, ``locked``).

The listing (:data:`_STATUS_SCRIPT`) prints one line per job directory:
``<name>\t<alive|dead>\t<killed|->\t<status record or nothing>``; a record that
is not the JSON object above reads as state ``unknown`` with the reason. An array
job's line is followed by ``+array\t<name>\t<spec>``, a line
``+task\t<name>\t<i>\t<alive|dead>\t<killed|->\t<record>`` per task that recorded
a state and ``+killed\t<name>\t<i>`` per task marked killed (no job name starts with ``+``).
"""

import contextlib
import json
import secrets
import shlex
import signal
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from ..config import is_valid_name
from ..errors import ConnectionLostError, JobError

#: ``pending``: queued by a scheduler, not started yet (crimpl.slurm); never in a status record.
STATES = ("not-submitted", "pending", "running", "complete", "failed", "killed", "preempted", "unknown")
#: The states a status record may hold.
#: ``preempted``: a spot notice ended it (crimpl.watchdog); never read as complete.
RECORD_STATES = ("running", "complete", "failed", "killed", "preempted")
ON_COMPLETE = (None, "stop", "terminate")
WRAPPER = "crimpl-job.sh"
LOG = "crimpl-log"
STATUS = "crimpl-status"
KILLED = "crimpl-killed"
#: Written by the watchdog when a spot notice came; the wrapper then records ``preempted``.
PREEMPTED = "crimpl-preempted"
#: ``<attempt> <retries> [lost]``: the attempt the wrapper runs, the retries on preemption asked for,
#: and ``lost`` when a relaunch on new capacity lost the previous attempt's checkpoint.
ATTEMPT = "crimpl-attempt"
COMMANDS_SCRIPT = "crimpl-script.sh"
#: The spec of an array job (:mod:`.arrays`); its tasks' records carry the suffix ``.<index>``.
ARRAY = "crimpl-array"
#: Prefixes of the names crimpl keeps in a job directory (``.crimpl-``: transfer's temporary files).
RESERVED_PREFIXES = ("crimpl-", ".crimpl-")
#: The lock that makes starting a job atomic, in ``<remote_dir>/jobs``.
LOCK = ".crimpl-lock"
#: Seconds a killed job gets to end on SIGTERM before its process group gets SIGKILL.
KILL_GRACE = 10
#: Seconds a start waits for the lock another start holds.
LOCK_WAIT = 30
#: Seconds a start waits for the wrapper's first status record.
START_WAIT = 10
#: Bytes of a status file that are read: a record is one short line.
_RECORD_LIMIT = 4096

# The one reading of a job's pid, shared by every command below and the wrapper.
_FUNCTIONS = r"""
crimpl_proc_start() {
  # Field 22 of /proc/PID/stat (start time); fields are counted after the last ")"
  # because the command name (field 2) may hold spaces and parentheses.
  crimpl_s=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
  crimpl_s=${crimpl_s##*") "}
  set -f; set -- $crimpl_s; set +f
  printf '%%s' "${20}"
}
# $2, where given, is the suffix of an array task's records: ".7" reads crimpl-status.7.
crimpl_record() { head -c %(limit)d "$1/%(status)s$2" 2> /dev/null | tr -d '\n\r'; }
crimpl_field() { printf '%%s' "$1" | sed -n "s/.*\"$2\": *\"\{0,1\}\([0-9a-f-]*\).*/\1/p"; }
crimpl_job_pid() {
  # Print the pid of job directory $1 (task $2) if that process is still its wrapper.
  crimpl_r=$(crimpl_record "$1" "$2")
  crimpl_pid=$(crimpl_field "$crimpl_r" pid)
  # Only a plain number above 1: `kill -- -1` would signal every process.
  case $crimpl_pid in ''|*[!0-9]*) return 1;; esac
  [ "$crimpl_pid" -gt 1 ] && kill -0 "$crimpl_pid" 2> /dev/null || return 1
  crimpl_b=$(crimpl_field "$crimpl_r" boot_id)
  if [ -n "$crimpl_b" ] && [ -r /proc/sys/kernel/random/boot_id ]; then
    [ "$crimpl_b" = "$(cat /proc/sys/kernel/random/boot_id)" ] || return 1
  fi
  crimpl_t=$(crimpl_field "$crimpl_r" pid_start)
  if [ -n "$crimpl_t" ] && [ -r "/proc/$crimpl_pid/stat" ]; then
    [ "$crimpl_t" = "$(crimpl_proc_start "$crimpl_pid")" ] || return 1
  fi
  printf '%%s\n' "$crimpl_pid"
}
crimpl_running() {
  crimpl_record "$1" "$2" | grep -q '"state": *"running"' && crimpl_job_pid "$1" "$2" > /dev/null
}
crimpl_detach() {
  # Run "$@" in a session of its own (its own process group), no child of this shell.
  if command -v setsid > /dev/null 2>&1; then
    setsid -f "$@" < /dev/null > /dev/null 2>&1
  else
    python3 -c 'import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)' "$@"
  fi
}
""" % {"limit": _RECORD_LIMIT, "status": STATUS}
#: The functions above, for another script that must read jobs the same way (crimpl.watchdog).
SHELL_FUNCTIONS = _FUNCTIONS

_WRAPPER_TEMPLATE = r"""#!/bin/sh
# crimpl job wrapper, generated by crimpl: runs the script detached and records its status.
cd "$(dirname "$0")" || exit 70
{functions}
ENTRY={entry}
ON_COMPLETE={on_complete}
# "--task I": run task I of an array job (started by the array's runner below, or by Slurm);
# its records carry the suffix ".I".
TASK=
if [ "$1" = --task ]; then
  case $2 in ''|*[!0-9]*) echo "crimpl-job.sh: --task takes an index" >&2; exit 64;; esac
  TASK=$2
fi
S=${{TASK:+.$TASK}}
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id 2> /dev/null)
PID_START=$(crimpl_proc_start $$)
# Sub-second times where date has %N (GNU), so jobs started in one second still sort.
now() {{ t=$(date -u +%Y-%m-%dT%H:%M:%S.%N); case $t in *N) t=$(date -u +%Y-%m-%dT%H:%M:%S);; esac; echo "${{t}}Z"; }}
record() {{
  printf '{{"state": "%s", "exit_code": %s, "pid": %s, "boot_id": "%s", "pid_start": "%s", "started": "%s", "ended": %s, "on_complete": "%s"}}\n' \
    "$1" "$2" "$$" "$BOOT_ID" "$PID_START" "$STARTED" "$3" "$ON_COMPLETE" > {status}$S.tmp && mv -f {status}$S.tmp {status}$S
}}
# Survive the kill of our own process group long enough to record it.
trap 'true' TERM INT HUP
STARTED=$(now)
record running null null
if [ -n "$TASK" ] && {{ [ -e {killed} ] || [ -e {killed}$S ]; }}; then
  # Killed before it started (the whole array, or this task): it never runs.
  record killed null "\"$(now)\""; exit 0
fi
CRIMPL_JOB_NAME={name}; CRIMPL_JOB_DIR=$(pwd); export CRIMPL_JOB_NAME CRIMPL_JOB_DIR
if [ -n "$TASK" ]; then CRIMPL_ARRAY_INDEX=$TASK; export CRIMPL_ARRAY_INDEX; fi
# The checkpoint folder stays in the job directory, so the next attempt finds it.
CRIMPL_ATTEMPT=1; read -r CRIMPL_ATTEMPT _ CRIMPL_CHECKPOINT_LOST < {attempt} 2> /dev/null
case $CRIMPL_ATTEMPT in ''|*[!0-9]*) CRIMPL_ATTEMPT=1;; esac
# "lost": relaunched on new capacity, the previous attempt's disk (and checkpoint) is gone.
case $CRIMPL_CHECKPOINT_LOST in lost) CRIMPL_CHECKPOINT_LOST=1;; *) CRIMPL_CHECKPOINT_LOST=0;; esac
CRIMPL_CHECKPOINT_DIR=$CRIMPL_JOB_DIR/checkpoint; export CRIMPL_ATTEMPT CRIMPL_CHECKPOINT_DIR CRIMPL_CHECKPOINT_LOST
[ -e {attempt} ] && mkdir -p checkpoint
if [ -z "$TASK" ] && [ -f {array_file} ]; then
{runner}
# "./$ENTRY": a name is never read as an option.
elif head -n 1 "./$ENTRY" | grep -q '^#!'; then
  chmod +x "./$ENTRY"; "./$ENTRY" > {log}$S 2>&1 < /dev/null &
elif command -v bash > /dev/null 2>&1; then
  bash "./$ENTRY" > {log}$S 2>&1 < /dev/null &
else
  sh "./$ENTRY" > {log}$S 2>&1 < /dev/null &
fi
child=$!
wait "$child"; code=$?
# A trapped signal ends `wait` early: wait again until the script has really exited.
while kill -0 "$child" 2> /dev/null; do wait "$child"; code=$?; done
if [ -e {killed}$S ] || {{ [ -n "$TASK" ] && [ -e {killed} ]; }}; then state=killed
elif [ -e {preempted} ]; then state=preempted
elif [ "$code" -eq 0 ]; then state=complete; else state=failed; fi
record "$state" "$code" "\"$(now)\""
if [ -z "$TASK" ] && [ -n "$ON_COMPLETE" ] && [ "$state" != killed ]; then
  echo "$(now) job $state; on_complete=$ON_COMPLETE: running the shutdown command" >> crimpl-on-complete.log
  {shutdown} >> crimpl-on-complete.log 2>&1
fi
"""

# The runner of an array job on a server without a scheduler: it starts each index as a
# task in its own session (so that one task can be killed alone), at most $limit at a time,
# and waits for them. It runs in the background of the wrapper, which waits for it as it
# waits for a script.
_RUNNER = r"""  spec=$(head -n 1 {array_file})
  limit=${{spec#*%}}
  [ "$limit" = "$spec" ] && limit=$(nproc 2> /dev/null || getconf _NPROCESSORS_ONLN 2> /dev/null)
  case $limit in ''|*[!0-9]*|0) limit=1;; esac
  # Each index of a spec such as 0-9,12,20-30:5, one a line.
  printf '%s\n' "${{spec%%%*}}" | tr , '\n' | while IFS=- read -r first rest; do
    last=${{rest%%:*}}; step=1
    case $rest in *:*) step=${{rest#*:}};; esac
    i=$first; while [ "$i" -le "${{last:-$first}}" ]; do echo "$i"; i=$((i + step)); done
  done | {{
    # A subshell: the kill of the wrapper's process group ends it, the wrapper records that.
    trap - TERM INT HUP
    running=
    reap() {{
      still=
      for t in $running; do crimpl_running . ".$t" && still="$still $t"; done
      running=$still
    }}
    while read -r i; do
      while :; do
        [ -e {killed} ] && break 2
        reap
        set -f; set -- $running; set +f
        [ $# -lt "$limit" ] && break
        sleep 0.2
      done
      crimpl_detach sh ./{wrapper} --task "$i"
      n=0
      while [ ! -s {status}.$i ] && [ $n -lt {start_ticks} ]; do sleep 0.05; n=$((n + 1)); done
      if [ -s {status}.$i ]; then
        running="$running $i"
      else
        S=.$i; record failed null "\"$(now)\""; S=
      fi
    done
    while [ -n "$running" ]; do sleep 0.2; reap; done
  }} &
"""

_STATUS_SCRIPT = r"""
tab=$(printf '\t')
for d in {dirs}; do
  [ -d "$d" ] || continue
  d=${{d%/}}
  r=$(crimpl_record "$d")
  alive=dead
  # Only a running record needs its process checked.
  case $r in *'"running"'*) crimpl_job_pid "$d" > /dev/null && alive=alive;; esac
  if [ -e "$d/{killed}" ]; then k=killed; else k=-; fi
  printf '%s\t%s\t%s\t%s\n' "${{d##*/}}" "$alive" "$k" "$r"
  [ -f "$d/{array_file}" ] || continue
  # An array: its spec, then a line per task that recorded a state, one awk for them all.
  printf '+array\t%s\t%s\n' "${{d##*/}}" "$(head -c 200 "$d/{array_file}" | tr -d '\n\r\t')"
  find "$d" -maxdepth 1 -name '{status}.[0-9]*' ! -name '*.tmp' -exec awk \
    'FNR == 1 {{ n = FILENAME; sub(/.*\./, "", n); printf "%s\t%s\n", n, substr($0, 1, {limit}) }}' {{}} + |
  while IFS="$tab" read -r i r; do
    case $i in ''|*[!0-9]*) continue;; esac
    alive=dead
    case $r in *'"running"'*) crimpl_job_pid "$d" ".$i" > /dev/null && alive=alive;; esac
    if [ -e "$d/{killed}.$i" ]; then k=killed; else k=-; fi
    printf '+task\t%s\t%s\t%s\t%s\t%s\n' "${{d##*/}}" "$i" "$alive" "$k" "$r"
  done
  for f in "$d/{killed}".[0-9]*; do
    [ -e "$f" ] && printf '+killed\t%s\t%s\n' "${{d##*/}}" "${{f##*.}}"
  done
done
"""

_START_SCRIPT = r"""
cd {jobs} || exit 3
name={name}
lock="$(pwd)/{lock}"
i=0
until mkdir "$lock" 2> /dev/null; do
  holder=$(cat "$lock/pid" 2> /dev/null)
  # The lock of a start that was killed is broken once its holder is gone (or,
  # killed before it wrote its pid, after a minute).
  if {{ [ -n "$holder" ] && ! kill -0 "$holder" 2> /dev/null; }} ||
     {{ [ -z "$holder" ] && [ -n "$(find "$lock" -maxdepth 0 -mmin +1 2> /dev/null)" ]; }}; then
    rm -rf "$lock"; continue
  fi
  i=$((i+1)); if [ $i -ge {lock_ticks} ]; then echo "locked $holder"; exit 0; fi
  sleep 0.1
done
echo $$ > "$lock/pid"
trap 'rm -rf "$lock"' EXIT
trap 'exit 129' HUP INT TERM
if [ ! -f "$name/{wrapper}" ]; then echo missing; exit 0; fi
if [ {again} = no ] && [ -e "$name/{status}" ]; then echo exists; exit 0; fi
if [ {again} = yes ] && crimpl_running "$name"; then echo running; exit 0; fi
if [ {allow_concurrent} = no ]; then
  for d in */; do
    d=${{d%/}}
    if [ "$d" != "$name" ] && crimpl_running "$d"; then
      # A new job refused for another one leaves nothing behind.
      [ {again} = yes ] || rm -rf -- "$name"
      echo "busy $d"; exit 0
    fi
  done
fi
cd "$name" || exit 3
# Temporary folders of interrupted uploads.
rm -rf ./.crimpl-upload-*
rm -f {status} {killed} {preempted} {status}.[0-9]* {killed}.[0-9]*
{rotate_logs}crimpl_detach sh {wrapper}
i=0
while [ ! -s {status} ] && [ $i -lt {start_ticks} ]; do sleep 0.05; i=$((i+1)); done
printf 'started\t%s\n' "$(crimpl_record .)"
"""

# Ends the processes of $targets, which {choose} sets: "-" is the job's wrapper, ".I" array
# task I. Each is marked killed first, so that it records killed.
_KILL_SCRIPT = r"""
cd {job_dir} || exit 3
{choose}
pids=
for t in $targets; do
  s=${{t#-}}
  pid=$(crimpl_job_pid . "$s") || continue
  pids="$pids $pid"
  touch {killed}$s
  kill -TERM -"$pid" 2> /dev/null  # no "--": dash's kill refuses it
done
[ -n "$pids" ] || {{ echo not-running; exit 0; }}
i=0
alive() {{ for p in $pids; do kill -0 "$p" 2> /dev/null && return 0; done; return 1; }}
while alive && [ $i -lt {grace_ticks} ]; do sleep 0.1; i=$((i+1)); done
ended=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for t in $targets; do
  s=${{t#-}}
  [ -e {status}$s ] || continue
  pid=$(crimpl_job_pid . "$s")
  if [ -n "$pid" ] || ! grep -q '"state": "killed"' {status}$s; then
    [ -n "$pid" ] && kill -KILL -"$pid" 2> /dev/null
    sed 's/"state": "running", "exit_code": null/"state": "killed", "exit_code": 137/; s/"ended": null/"ended": "'"$ended"'"/' \
      {status}$s > {status}$s.tmp && mv -f {status}$s.tmp {status}$s
  fi
done
echo killed
"""

# The whole of an array: its runner and every task running. The array is marked killed
# before the tasks are listed: a task that starts later sees the mark and never runs.
_KILL_ARRAY = r"""running_tasks() {{
  find . -maxdepth 1 -name '{status}.[0-9]*' ! -name '*.tmp' -exec grep -l '"state": *"running"' {{}} + |
    sed 's|.*\.|.|'
}}
if ! crimpl_job_pid . > /dev/null && [ -z "$(running_tasks)" ]; then echo not-running; exit 0; fi
touch {killed}
targets="- $(running_tasks)"
"""

# One task of an array. Marked first: a task that has not recorded a state yet never runs.
_KILL_TASK = r"""touch {killed}.{index}
if [ ! -s {status}.{index} ]; then
  if crimpl_job_pid . > /dev/null; then echo killed; else rm -f {killed}.{index}; echo not-running; fi
  exit 0
fi
targets=.{index}
"""

# Prints the log from byte offset+1; while the job is alive, follows it until the job ends.
_FOLLOW_SCRIPT = r"""
cd {job_dir} || exit 3
# An array task that waits for a free slot: wait while the array's runner runs.
while [ -n "{task}" ] && [ ! -s {status}{task} ] && crimpl_job_pid . > /dev/null; do sleep 0.5; done
if pid=$(crimpl_job_pid . "{task}"); then
  # -F: the wrapper may not have created the log yet.
  exec tail -c +{start} -s 0.5 -F --pid="$pid" {log}
fi
[ -e {log} ] || exit 0
exec tail -c +{start} {log}
"""


def _script(body: str, **fields) -> str:
    """Return ``body`` formatted with ``fields``, after the shared shell functions."""
    return _FUNCTIONS + body.format(**fields)


def run(conn, command, **kwargs):
    """Run ``command`` on ``conn`` quietly; raise :class:`ConnectionLostError` if the connection fails.

    Ctrl-C while it runs raises :class:`KeyboardInterrupt` once the (short) command returned.
    """
    import paramiko

    kwargs.setdefault("hide", True)
    try:
        with _interrupt_kept():
            return conn.run(command, warn=True, in_stream=False, **kwargs)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise ConnectionLostError(f"lost the SSH connection while running a job command: {exc}") from exc


@contextlib.contextmanager
def _interrupt_kept():
    """Re-raise a Ctrl-C that invoke's runner swallowed during the block.

    invoke's ``Runner`` catches :class:`KeyboardInterrupt`, forwards it to the
    command and keeps waiting, and never raises it: without this, Ctrl-C during
    a status read was lost and ``logs --follow`` or ``wait`` went on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    interrupted = []

    def remember(signum, frame):
        interrupted.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def _checked(result, what):
    if result.exited != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise JobError(f"{what} failed on the server (exit {result.exited}): "
                       f"{detail[-1] if detail else 'no output'}")
    return result


def job_dir(root: str, name: str) -> str:
    """Return the job directory of ``name`` under the remote root ``root``."""
    return f"{root.rstrip('/')}/jobs/{name}"


def new_job_name(entry: str) -> str:
    """Return a fresh job name: ``<UTC time>-<script stem>-<4 hex digits>``.

    The random tail keeps two submissions in the same second apart.
    """
    stem = Path(entry).stem if entry != COMMANDS_SCRIPT else "commands"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:30] or "job"
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{stem}-{secrets.token_hex(2)}"


def check_job_name(name) -> None:
    """Raise :class:`JobError` unless ``name`` is a valid job name."""
    if not is_valid_name(name):
        raise JobError(f"job name {name!r} is not valid: use letters, digits, '.', '_' and '-'")


def reserved_name(name: str, script: bool = False) -> bool:
    """Is ``name`` (as it appears in the job directory) one crimpl keeps for itself?

    :param script: the name of the script, which may not start with ``-`` either.
    """
    return name.startswith(RESERVED_PREFIXES) or name in ("", ".", "..") or (
        script and name.startswith("-"))


def render_wrapper(name: str, entry: str, on_complete: str | None, shutdown_command: str) -> str:
    """Return the text of ``crimpl-job.sh`` for one job (an array's too: see :mod:`.arrays`)."""
    runner = _RUNNER.format(array_file=ARRAY, killed=KILLED, wrapper=WRAPPER, status=STATUS,
                            start_ticks=START_WAIT * 20)
    return _WRAPPER_TEMPLATE.format(
        functions=_FUNCTIONS.strip(), entry=shlex.quote(entry), name=shlex.quote(name),
        on_complete=shlex.quote(on_complete or ""), shutdown=shutdown_command, status=STATUS,
        log=LOG, killed=KILLED, preempted=PREEMPTED, attempt=ATTEMPT, array_file=ARRAY, runner=runner.rstrip(),
    )


def task_suffix(index: int | None) -> str:
    """The suffix of array task ``index``'s records (``.7``); empty for a whole job."""
    return "" if index is None else f".{int(index)}"


def rotate_logs(again: bool) -> str:
    """Shell that moves the logs of the run before a resubmit (an array's too) to ``<log>.previous``."""
    if not again:
        return ""
    return (f'for f in {LOG} {LOG}.[0-9]*; do\n  case $f in *.previous) continue;; esac\n'
            '  [ -e "$f" ] && mv -f "$f" "$f.previous"\ndone\n')


# -- reading what the commands print ---------------------------------------------------------


def parse_listing(text: str) -> dict:
    """Return ``{job_name: record}`` from the listing :data:`_STATUS_SCRIPT` prints.

    The record of an array job also has ``array`` (its spec), ``tasks`` (``{index:
    record}`` of the tasks that recorded a state) and ``killed_tasks`` (the indexes
    killed), and always ``killed``; :func:`crimpl.jobs.arrays.local_status` reads them.
    """
    records, killed_jobs = {}, set()
    for line in text.splitlines():
        if line.startswith("+"):
            _array_line(records, killed_jobs, line)
            continue
        parts = line.split("\t", 3)
        if len(parts) != 4 or not is_valid_name(parts[0]):
            continue
        name, alive, killed, record = parts
        records[name] = parse_record(record, alive == "alive", killed == "killed")
        if killed == "killed":
            killed_jobs.add(name)
    return records


def _array_line(records, killed_jobs, line):
    """Add what one ``+array``, ``+task`` or ``+killed`` line of the listing says to ``records``."""
    kind, _, rest = line.partition("\t")
    parts = rest.split("\t", 4)
    record = records.get(parts[0])
    if record is None:
        return  # the job's own line comes first
    if kind == "+array" and len(parts) == 2:
        record.update(array=parts[1], tasks={}, killed_tasks=set(), killed=parts[0] in killed_jobs)
    elif kind == "+task" and len(parts) == 5 and parts[1].isdigit() and "tasks" in record:
        _, index, alive, killed, text = parts
        record["tasks"][int(index)] = parse_record(
            text, alive == "alive", killed == "killed" or record["killed"])
    elif kind == "+killed" and len(parts) == 2 and parts[1].isdigit() and "tasks" in record:
        record["killed_tasks"].add(int(parts[1]))


def parse_record(text: str, alive: bool, killed: bool) -> dict:
    """Return the fields of a :class:`~crimpl.jobs.JobStatus` from one status record.

    :param text: the record (empty: the job was never started).
    :param alive: the recorded process is still the job's.
    :param killed: the job was killed.
    """
    if not text.strip():
        return {"state": "not-submitted", "detail": "uploaded but never started"}
    try:
        data = json.loads(text)
    except ValueError:
        return {"state": "unknown", "detail": f"unreadable {STATUS} (not JSON): {text[:60]!r}"}
    if not isinstance(data, dict):
        return {"state": "unknown", "detail": f"unreadable {STATUS} (not a JSON object): {text[:60]!r}"}
    problem = _record_problem(data)
    if problem:
        return {"state": "unknown", "detail": f"unreadable {STATUS}: {problem}"}
    fields = {"exit_code": data.get("exit_code"), "started": data.get("started"),
              "ended": data.get("ended"), "on_complete": data.get("on_complete") or None}
    state = data["state"]
    if state == "running" and not alive:
        if killed:
            return {"state": "killed", **fields}
        return {"state": "failed", **fields,
                "detail": "the job's process ended without recording an exit code "
                          "(was the server restarted?)"}
    return {"state": state, **fields}


def _record_problem(data):
    """What is wrong with a parsed status record, or None."""
    state = data.get("state")
    if state not in RECORD_STATES:
        return f"state {state!r} is not one of {', '.join(RECORD_STATES)}"
    code = data.get("exit_code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        return f"exit_code {code!r} is not a number"
    for key in ("started", "ended"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key} {data[key]!r} is not a time"
    if data.get("on_complete") not in (*ON_COMPLETE, ""):
        return f"on_complete {data['on_complete']!r} is not stop, terminate or empty"
    return None


# -- the commands ---------------------------------------------------------------------------


def read_records(conn, root: str, names=None) -> dict:
    """Return ``{job_name: record}`` for the given jobs that exist, or for every job under ``root``."""
    if names is None:
        dirs = f"{shlex.quote(root.rstrip('/') + '/jobs')}/*/"
    else:
        dirs = " ".join(shlex.quote(job_dir(root, n)) for n in names)
    result = run(conn, _script(_STATUS_SCRIPT, dirs=dirs, killed=KILLED, array_file=ARRAY, status=STATUS,
                               limit=_RECORD_LIMIT))
    return parse_listing(result.stdout)


def start(conn, root: str, name: str, *, again: bool = False, allow_concurrent: bool = False):
    """Start the job's wrapper detached, atomically with the checks.

    :param again: run a job that ran before (a resubmit); else the job must never have started.
    :param allow_concurrent: start even while another job runs.
    :returns: ``(outcome, detail)``: ``("started", record fields)``, or the reason it
        did not start: ``("exists", None)``, ``("busy", other job)``, ``("running", None)``,
        ``("missing", None)`` (no wrapper), ``("locked", holder pid)``.
    """
    script = start_script(root, name, again=again, allow_concurrent=allow_concurrent)
    return parse_start(_checked(run(conn, script), f"starting job {name}").stdout, name)


def start_script(root: str, name: str, *, again: bool = False, allow_concurrent: bool = False) -> str:
    """The shell code :func:`start` runs (also run at the end of a submit's upload, in its command)."""
    return _script(
        _START_SCRIPT, jobs=shlex.quote(root.rstrip("/") + "/jobs"), name=shlex.quote(name),
        lock=LOCK, lock_ticks=LOCK_WAIT * 10, start_ticks=START_WAIT * 20, wrapper=WRAPPER,
        status=STATUS, killed=KILLED, preempted=PREEMPTED, again="yes" if again else "no",
        allow_concurrent="yes" if allow_concurrent else "no", rotate_logs=rotate_logs(again),
    )


def parse_start(stdout: str, name: str):
    """Return ``(outcome, detail)`` from what :func:`start_script` printed (see :func:`start`)."""
    lines = stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("started"):
        return "started", parse_record(last.partition("\t")[2], True, False)
    outcome, _, detail = last.partition(" ")
    if outcome not in ("exists", "busy", "running", "missing", "locked"):
        raise JobError(f"starting job {name} failed on the server: unexpected answer {outcome!r}")
    return outcome, detail or None


# The quick look before a submit sends anything: the same rules as the start, without the
# lock (the start checks again under it). Prints "ok", "exists" or "busy <job>".
_GUARD_SCRIPT = r"""
cd {jobs} 2> /dev/null || {{ echo ok; exit 0; }}
if [ -e {name}/{status} ]; then echo exists; exit 0; fi
if [ {allow_concurrent} = no ]; then
  for d in */; do
    d=${{d%/}}
    if [ "$d" != {name} ] && crimpl_running "$d"; then echo "busy $d"; exit 0; fi
  done
fi
echo ok
"""


def guard_script(root: str, name: str, *, allow_concurrent: bool = False) -> str:
    """Shell code that says, before a new job's upload, whether it may start: ``ok``,
    ``exists`` or ``busy <job>`` (a job directory never started is what an interrupted
    submit left: ``ok``, to complete it)."""
    return _script(_GUARD_SCRIPT, jobs=shlex.quote(root.rstrip("/") + "/jobs"), name=shlex.quote(name),
                   status=STATUS, allow_concurrent="yes" if allow_concurrent else "no")


def kill(conn, root: str, name: str, *, index: int | None = None) -> bool:
    """End the job's whole process group; return True if it was running.

    Of an array job, end its runner and every task, and start no more.

    :param index: end only this task of an array job (one that waits never starts).
    """
    if index is not None:
        choose = _KILL_TASK.format(status=STATUS, killed=KILLED, index=int(index))
    else:
        # Whether the job is an array, the job directory says.
        choose = (f"if [ -f {ARRAY} ]; then\n{_KILL_ARRAY.format(status=STATUS, killed=KILLED)}"
                  "else\n  targets=-\nfi")
    script = _script(_KILL_SCRIPT, job_dir=shlex.quote(job_dir(root, name)), status=STATUS,
                     killed=KILLED, grace_ticks=KILL_GRACE * 10, choose=choose)
    what = f"killing task {index} of job {name}" if index is not None else f"killing job {name}"
    result = _checked(run(conn, script), what)
    return result.stdout.strip().endswith("killed")


def needs_index(name: str, indexes: str) -> JobError:
    """The error for a look at the log of array job ``name`` that names no task."""
    return JobError(f"job {name} is an array (tasks {indexes}): pass the index of a task "
                    "(index=7, or `crimpl logs --index 7`)")


def read_log(conn, root: str, name: str, index: int | None = None) -> str:
    """Return the job's log as it is now (task ``index``'s, for an array).

    :raises JobError: if the job is an array and ``index`` is None.
    """
    directory = shlex.quote(job_dir(root, name))
    if index is not None:
        return run(conn, f"cat {directory}/{LOG}{task_suffix(index)} 2> /dev/null").stdout
    # Exit 65 (and the spec) for an array, which has no log of its own.
    result = run(conn, f"cd {directory} 2> /dev/null || exit 0; if [ -f {ARRAY} ]; then "
                       f"head -c 200 {ARRAY}; exit 65; fi; cat {LOG} 2> /dev/null")
    if result.exited == 65:
        raise needs_index(name, result.stdout.strip().split("%")[0])
    return result.stdout


def stream_log(conn, root: str, name: str, offset: int = 0, tick: float = 15.0, script: str | None = None,
               index: int | None = None):
    """Yield the job's log from byte ``offset``, following it while the job is alive.

    ``index``: the log of that task of an array job, followed while the task runs (or
    waits for a slot).

    ``script`` replaces the shell that prints the log (a scheduler's kind follows while
    its scheduler says the job lives).

    Yields ``bytes``; an empty chunk every ``tick`` seconds without data, so that the
    caller can look at the server between chunks. Returns once the job ended and
    every byte was read.

    :raises ConnectionLostError: if the stream was cut (the caller may resume from
        the bytes it got).
    :raises JobError: if the command failed on the server.
    """
    from ..transfer.streams import CHUNK, CONNECTION_ERRORS, open_stream, opened

    script = script or _script(_FOLLOW_SCRIPT, job_dir=shlex.quote(job_dir(root, name)),
                               log=LOG + task_suffix(index), start=offset + 1, task=task_suffix(index),
                               status=STATUS)
    try:
        with opened(open_stream(conn, script)) as stream:
            channel = getattr(stream, "channel", None)  # None for the local target's process
            if channel is not None:
                channel.settimeout(tick)
            while True:
                try:
                    data = stream.recv(CHUNK)
                except socket.timeout:
                    yield b""
                    continue
                if not data:
                    break
                yield data
            status, stderr = stream.finish()
    except CONNECTION_ERRORS as exc:
        raise ConnectionLostError(f"the log stream of job {name} was cut: {exc}") from exc
    if status == -1:
        raise ConnectionLostError(f"the log stream of job {name} was cut (no exit status)")
    if status != 0:
        last = stderr.strip().splitlines()
        raise JobError(f"following the log of job {name} failed on the server (exit {status}): "
                       f"{last[-1] if last else 'no output'}")


def list_files(conn, root: str, name: str) -> list:
    """Return the files in the job directory, relative to it, sorted."""
    directory = shlex.quote(job_dir(root, name))
    result = run(conn, f"cd {directory} 2> /dev/null && find . -mindepth 1 | sort")
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("./")]
