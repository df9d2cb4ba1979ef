"""benchmarks/bench_user.py runs end to end in its quick mode, writes its table, and leaves no server behind.

These tests check behaviour, never timing: every case has a row for the API and
for the ``crimpl`` command with a number in each cell, the docs section is
replaced in place, and the sandbox's servers end with the run, also when it is
interrupted.
"""

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sandbox import process_alive, wait_until

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_user.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_user import SECTION_END, SECTION_START, Sizes, build_cases  # noqa: E402

NUMBER_CELLS = {2: r"\d+\.\d{3} s", 4: r"\d+\.\d{3} s", 5: r"\d+\.\d{2}x( throughput)?"}
N = r"\d+(\.\d+)?"  # a median of counts may fall between two
TRIPS = rf"{N} conn, {N} chan(, {N} EC2)?( \(reported: {N} conn, {N} chan\))?"


def _table_rows(text):
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case ")]


def test_the_quick_run_writes_a_row_with_numbers_for_every_case_and_path(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Transfer benchmark\n\nkept before\n\n{SECTION_START}\nstale row\n{SECTION_END}\n\nkept after\n")
    results = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(docs), "--json", str(results)],
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    text = docs.read_text()
    assert "kept before" in text and "kept after" in text
    assert "stale row" not in text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    rows = _table_rows(text.split(SECTION_START, 1)[1])
    quick = Sizes(files=20, big=4 * 2**20, changed=10)
    expected = [(case.label, via) for case in build_cases(quick) for via in ("`AWSEC2`", "`crimpl`")]
    assert [(row[0], row[1]) for row in rows] == expected
    for row in rows:
        assert len(row) == 10, row
        for index, pattern in NUMBER_CELLS.items():
            assert re.fullmatch(pattern, row[index]), (row[0], index, row[index])
        assert row[7] in ("met", "**missed**"), row
        assert re.fullmatch(TRIPS, row[8]) and re.fullmatch(TRIPS, row[9]), row
    assert "python3 benchmarks/bench_user.py --quick" in text
    assert "nproc = " in text and "import crimpl.cli" in text

    # Every server it started is gone, and so is its work folder.
    info = json.loads(results.read_text())
    assert set(info["pids"]) == {"sshd", "moto_server", "proxy"}
    wait_until(lambda: not any(process_alive(pid) for pid in info["pids"].values()), timeout=20,
               what="the benchmark's servers to end")
    work = re.search(r"sandbox ready in (\S+):", done.stdout).group(1)
    assert not Path(work).exists()


def test_an_interrupted_run_stops_every_server_it_started(tmp_path):
    process = subprocess.Popen([sys.executable, str(BENCH), "--quick"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        ready = wait_until(lambda: next((line for line in lines if line.startswith("sandbox ready")), None)
                           or process.poll() is not None and "exited", timeout=300, what="the sandbox")
        assert ready != "exited", process.stderr.read()[-3000:]
        pids = json.loads(ready.split("pids ", 1)[1])
        work = re.search(r"sandbox ready in (\S+):", ready).group(1)
        assert all(process_alive(pid) for pid in pids.values())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "interrupted" in process.stderr.read()
    wait_until(lambda: not any(process_alive(pid) for pid in pids.values()), timeout=20,
               what="the benchmark's servers to end")
    assert not Path(work).exists()
