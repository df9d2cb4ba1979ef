"""Inputs shared across jobs through the server's store, on an EC2 instance (real sshd) and locally.

The sshd's "remote" side is this machine, so the tests look at the store and the
job directories on disk. Every store object must hold the content its name
hashes, with the mtime and mode its name records: :func:`assert_store_intact`.
"""

import contextlib
import hashlib
import os
import re
import signal
import stat
from pathlib import Path

import invoke
import pytest

import crimpl
from cli_helper import run_cli
from crimpl import transfer
from crimpl.errors import JobError, TransferError
from crimpl.transfer import store as objects
from sandbox import Background, cut_after_first_mib, processes_with, session_pids, wait_until

OBJECT_NAME = re.compile(r"[0-9a-f]{64}_-?[0-9]+_[0-7]+")


@pytest.fixture(params=["local", "ec2"])
def target(request, tmp_path):
    if request.param == "local":
        return crimpl.Local(root=tmp_path / "local")
    return request.getfixturevalue("ec2_server")


def make_inputs(root, nfiles=30, tag=""):
    """A folder of small distinct files, one executable, one nested.

    :param tag: text that makes the numbered files differ from another folder's.
    """
    root = Path(root)
    (root / "sub").mkdir(parents=True)
    for i in range(nfiles):
        (root / f"f{i:03}.txt").write_text(f"{tag}line {i}\n" * (i + 1))
    (root / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (root / "sub" / "tool.sh").chmod(0o755)
    (root / "input.txt").write_text("the original input\n")
    return root


def store_of(target):
    return Path(target.store_dir)


def assert_store_intact(store):
    """Every object holds the content its name hashes, with the mtime and mode the name records."""
    for path in Path(store).iterdir():
        assert OBJECT_NAME.fullmatch(path.name), f"not an object: {path.name}"
        digest, mtime, mode = path.name.rsplit("_", 2)
        st = path.stat()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path.name
        assert st.st_mtime_ns == int(mtime) * 10**9, path.name
        assert f"{stat.S_IMODE(st.st_mode):o}" == mode, path.name


def finish(job):
    status = job.wait(timeout=30, interval=0.1)
    assert status.state == "complete", (status, job.logs())
    return status


# --------------------------------------------------------------------------- deduplication


def test_a_second_job_with_the_same_inputs_sends_no_input_bytes(target, tmp_path):
    data = make_inputs(tmp_path / "data")
    script = tmp_path / "run.sh"
    script.write_text("cat data/input.txt\n./data/sub/tool.sh\n")
    first = target.submit_script(script, files=[data])
    finish(first)
    assert first.upload_report.files_linked == 0

    second = target.submit_script(script, files=[data])

    report = second.upload_report
    # Only the wrapper, which names its own job, crosses the connection.
    assert report.files == ["crimpl-job.sh"]
    assert report.bytes_sent == (Path(second.job_dir) / "crimpl-job.sh").stat().st_size
    assert report.files_linked == 33  # 32 inputs and the script
    assert report.bytes_linked == sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) \
        + script.stat().st_size
    finish(second)
    assert second.logs() == "the original input\ntool\n"
    for path in data.rglob("*"):
        copy = Path(second.job_dir) / "data" / path.relative_to(data)
        if path.is_file():
            assert copy.read_bytes() == path.read_bytes()
            assert copy.stat().st_mode & 0o777 == path.stat().st_mode & 0o555
            assert copy.stat().st_mtime_ns == int(path.stat().st_mtime) * 10**9
    assert_store_intact(store_of(target))


def test_only_the_changed_files_of_a_new_job_are_sent(target, tmp_path):
    data = make_inputs(tmp_path / "data")
    finish(target.submit_script(["true"], files=[data]))
    (data / "f003.txt").write_text("changed\n")
    (data / "new.txt").write_text("new\n")

    job = target.submit_script(["cat data/f003.txt data/new.txt"], files=[data])

    report = job.upload_report
    inputs_sent = sorted(f for f in report.files if f.startswith("data/"))
    assert inputs_sent == ["data/f003.txt", "data/new.txt"]
    assert report.files_linked == 31
    finish(job)
    assert job.logs() == "changed\nnew\n"


def test_a_resubmit_sends_only_what_changed_and_keeps_the_store_intact(target, tmp_path):
    data = make_inputs(tmp_path / "data")
    job = target.submit_script(["cat data/input.txt"], files=[data])
    finish(job)
    (data / "input.txt").write_text("edited locally\n")

    job.resubmit()

    assert job.upload_report.files == ["data/input.txt"]
    assert job.upload_report.files_skipped == 31
    finish(job)
    assert job.logs() == "edited locally\n"
    assert_store_intact(store_of(target))


def test_the_local_hash_index_is_private(target, tmp_path, crimpl_home):
    data = make_inputs(tmp_path / "data", nfiles=2)
    finish(target.submit_script(["true"], files=[data]))
    index = crimpl_home / objects.INDEX_FILE
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert not list(crimpl_home.glob(f".{objects.INDEX_FILE}.*"))  # no temporary file left


def test_two_processes_saving_the_index_keep_each_others_entries(tmp_path, crimpl_home):
    one, two = objects.HashIndex(), objects.HashIndex()  # both loaded before either saves
    one.record(tmp_path / "a", 1, 10, 100, "a" * 64)
    two.record(tmp_path / "b", 2, 20, 200, "b" * 64)
    one.save()
    two.save()
    again = objects.HashIndex()
    assert again.lookup(tmp_path / "a", 1, 10, 100) == "a" * 64
    assert again.lookup(tmp_path / "b", 2, 20, 200) == "b" * 64
    assert again.lookup(tmp_path / "b", 2, 21, 200) is None  # another mtime: hashed again


def test_an_unreadable_index_is_started_afresh(tmp_path, crimpl_home):
    crimpl_home.mkdir(parents=True, exist_ok=True)
    (crimpl_home / objects.INDEX_FILE).write_text("{not json")
    index = objects.HashIndex()
    index.record(tmp_path / "a", 1, 10, 100, "a" * 64)
    index.save()
    assert objects.HashIndex().lookup(tmp_path / "a", 1, 10, 100) == "a" * 64


# --------------------------------------------------------------------------- integrity guard


# The write bit is given back for the write and taken again (the file then has its
# stored mode), so that only the size or the mtime tells the object changed.
EDITS = {
    "append": "chmod u+w data/input.txt && echo x >> data/input.txt && chmod a-w data/input.txt",
    "truncate": "chmod u+w data/input.txt && : > data/input.txt && chmod a-w data/input.txt",
    "same-size rewrite": "chmod u+w data/input.txt && printf 'THE ORIGINAL INPUT\\n' > data/input.txt"
                         " && chmod a-w data/input.txt",
    "chmod and rewrite": "chmod 644 data/input.txt && printf 'the original inpuT\\n' > data/input.txt",
    "chmod only": "chmod 600 data/input.txt",
    "replace": "rm -f data/input.txt && echo other > data/input.txt",
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_job_that_edits_an_input_in_place_leaves_the_next_job_the_original(target, tmp_path, edit):
    data = make_inputs(tmp_path / "data", nfiles=3)
    editor = target.submit_script([EDITS[edit]], files=[data])
    finish(editor)

    after = target.submit_script(["cat data/input.txt"], files=[data])

    finish(after)
    assert after.logs() == "the original input\n"
    assert_store_intact(store_of(target))
    if edit != "replace":
        # The edited object was evicted and the file sent again.
        assert "data/input.txt" in after.upload_report.files
    else:
        # A new file in the job directory leaves the object alone: still linked.
        assert "data/input.txt" not in after.upload_report.files


def test_inputs_are_read_only_in_the_job_directory(target, tmp_path):
    data = make_inputs(tmp_path / "data", nfiles=1)
    job = target.submit_script(["true"], files=[data])
    finish(job)
    copy = Path(job.job_dir) / "data" / "sub" / "tool.sh"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o555


# --------------------------------------------------------------------------- size cap, clean


def test_eviction_under_the_size_cap_keeps_every_live_jobs_inputs(target, tmp_path):
    old = make_inputs(tmp_path / "old", tag="old ")
    # A finished job that removed its inputs leaves objects nothing links.
    finish(target.submit_script(["rm -rf old"], files=[old]))
    store = store_of(target)
    unlinked = {p.name for p in store.iterdir() if p.stat().st_nlink == 1}
    assert len(unlinked) >= 30
    gate = tmp_path / "gate"
    data = make_inputs(tmp_path / "data")
    target.store_cap = 1  # far below what the live job's inputs take

    live = target.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done", "cat data/input.txt"],
                                files=[data])

    names = {p.name for p in store.iterdir()}
    assert len(unlinked - names) >= 30  # the old job's own inputs went
    # What is left is linked by a job directory: the live job's inputs all stay.
    assert all(p.stat().st_nlink > 1 for p in store.iterdir())
    # A new job while it runs still finds every input of the live one in the store.
    other = target.submit_script(["cat data/input.txt"], files=[data], allow_concurrent=True)
    assert [f for f in other.upload_report.files if f.startswith("data/")] == []
    gate.touch()
    finish(live)
    finish(other)
    assert live.logs() == other.logs() == "the original input\n"
    assert_store_intact(store)


def ctime_now(folder):
    """The ctime the kernel stamps now, read from a probe file in ``folder``."""
    probe = Path(folder) / "ctime-probe"
    probe.touch()
    probe.chmod(0o600)
    return probe.stat().st_ctime_ns


def test_eviction_removes_the_least_recently_linked_first(connect, tmp_path):
    store = tmp_path / "remote" / "objects"
    sources = {}
    for name, size in (("a", 1000), ("b", 2000), ("c", 3000)):
        sources[name] = tmp_path / name
        sources[name].mkdir()
        (sources[name] / f"{name}.bin").write_bytes(name.encode() * size)
    for name in "ab":
        transfer.upload(connect(), [sources[name]], str(tmp_path / "remote" / name), quiet=True,
                        store=str(store))
    # a's object loses its last link first, then b's.
    for name in "ab":
        os.unlink(tmp_path / "remote" / name / name / f"{name}.bin")
        # The kernel stamps ctimes from a coarse clock: let it tick before the next unlink.
        stamped = max(p.stat().st_ctime_ns for p in store.iterdir() if p.stat().st_nlink == 1)
        wait_until(lambda: ctime_now(tmp_path) > stamped, timeout=5, interval=0.001,
                   what="the ctime clock to tick")

    transfer.upload(connect(), [sources["c"]], str(tmp_path / "remote" / "c"), quiet=True,
                    store=str(store), store_cap=5000)

    kept = sorted(p.stat().st_size for p in store.iterdir())
    assert kept == [2000, 3000]


def test_clean_dry_run_lists_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_inputs(tmp_path / "data", nfiles=2)
    local = crimpl.Local()
    finished = [local.submit_script(["true"], files=[data], job_name=f"done-{i}") for i in range(2)]
    for job in finished:
        finish(job)
    gate = tmp_path / "gate"
    running = local.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"],
                                  files=[make_inputs(tmp_path / "live", nfiles=2)],
                                  job_name="running", allow_concurrent=True)
    before = sorted(str(p) for p in local.root.rglob("*"))

    dry = run_cli("clean", "--older-than", "0", "--dry-run", "--stack", "local")

    assert dry.code == 0, dry.stderr
    assert "would remove job done-0" in dry.stdout and "would remove job done-1" in dry.stdout
    assert "running" not in dry.stdout
    assert sorted(str(p) for p in local.root.rglob("*")) == before

    done = run_cli("clean", "--older-than", "0", "--stack", "local")

    assert done.code == 0, done.stderr
    assert "removed job done-0" in done.stdout
    assert [s for s in dry.stdout.splitlines() if "job(s)" in s][0].replace("would remove", "removed") \
        in done.stdout
    assert set(local.job_statuses()) == {"running"}
    # Every object left is linked by the running job.
    assert all(p.stat().st_nlink > 1 for p in Path(local.store_dir).iterdir())
    gate.touch()
    finish(running)
    assert local.clean(0, dry_run=True).jobs == ["running"]


def test_clean_keeps_jobs_younger_than_the_limit(target):
    finish(target.submit_script(["true"], job_name="recent"))
    report = target.clean(1)
    assert report.jobs == []
    assert "recent" in target.job_statuses()


def test_clean_refuses_a_negative_age(target):
    with pytest.raises(JobError, match="0 or more"):
        target.clean(-1)


# --------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("how", ["client drops the connection", "server session is killed"])
def test_a_cut_during_a_deduplicating_upload_leaves_no_half_written_object(connect, sshd, tmp_path, how):
    data = make_inputs(tmp_path / "data")
    store = tmp_path / "remote" / "objects"
    first = connect()
    transfer.upload(first, [data], str(tmp_path / "remote" / "first"), quiet=True, store=str(store))
    first.close()  # its session must not outlive the test's wait for the cut one
    before = sorted(p.name for p in store.iterdir())
    with open(data / "big.bin", "wb") as handle:
        handle.truncate(200 * 2**20)  # sparse, still 200 MiB to send
    conn = connect()

    with pytest.raises(TransferError, match="retry"):
        transfer.upload(conn, [data], str(tmp_path / "remote" / "second"), quiet=True, store=str(store),
                        callback=cut_after_first_mib(conn, how, sshd))

    wait_until(lambda: not session_pids(sshd.process.pid), timeout=30, what="the cut session to end")
    assert sorted(p.name for p in store.iterdir()) == before
    assert_store_intact(store)
    assert not (tmp_path / "remote" / "second" / "data").exists()

    retry = transfer.upload(connect(), [data], str(tmp_path / "remote" / "second"), quiet=True,
                            store=str(store))
    assert retry.files == ["data/big.bin"]
    assert retry.files_linked == 32
    assert_store_intact(store)


def test_a_submit_cut_during_its_upload_starts_no_job_and_stores_nothing(ec2_server, tmp_path):
    data = make_inputs(tmp_path / "data")
    finish(ec2_server.submit_script(["true"], files=[data]))
    store = store_of(ec2_server)
    before = sorted(p.name for p in store.iterdir())
    with open(data / "big.bin", "wb") as handle:
        handle.truncate(256 * 2**20)
    directory = Path(ec2_server.job_root) / "jobs" / "cut"
    submit = Background(lambda: ec2_server.submit_script(["true"], files=[data], job_name="cut",
                                                          quiet=True))
    temporary = wait_until(lambda: list(directory.glob(".crimpl-upload-*")), timeout=60, interval=0.002,
                           what="upload under way")
    # Kill the receiving end (its shell and tar name the random folder) mid-stream.
    killed = []
    for pid in processes_with(temporary[0].name.encode()):
        with contextlib.suppress(ProcessLookupError):  # a short-lived command (mkdir, rm) ended
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    assert killed, "no process of the upload was left to kill"
    wait_until(lambda: submit.done, timeout=60, what="the cut submit to return")

    assert isinstance(submit.error, TransferError), submit.error or submit.result
    assert not (directory / "crimpl-status").exists()
    assert sorted(p.name for p in store.iterdir()) == before
    assert_store_intact(store)


def test_the_store_works_for_the_local_target_without_ssh(tmp_path):
    data = make_inputs(tmp_path / "data", nfiles=1)
    remote = tmp_path / "remote"
    transfer.upload(invoke.Context(), [data], str(remote / "one"), quiet=True, store=str(remote / "objects"))
    report = transfer.upload(invoke.Context(), [data], str(remote / "two"), quiet=True,
                             store=str(remote / "objects"))
    assert report.files == [] and report.files_linked == 3
    assert (remote / "two" / "data" / "input.txt").read_text() == "the original input\n"
