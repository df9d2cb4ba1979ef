"""benchmarks/bench_user.py runs end to end in its quick mode, writes its table, and leaves no server behind.

These tests check behaviour, never timing: every case has a row for the API and
for the ``crimpl`` command with a number in each cell, the docs section is
replaced in place, and the sandbox's servers end with the run, also when it is
interrupted.
"""

import re
import sys
from pathlib import Path

from bench_runs import interrupt_once_ready, quick_run_into_docs, servers_stopped, table_rows

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_user.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_user import SECTION_END, SECTION_START, Sizes, build_cases  # noqa: E402

NUMBER_CELLS = {2: r"\d+\.\d{3} s", 4: r"\d+\.\d{3} s", 5: r"\d+\.\d{2}x( throughput)?"}
N = r"\d+(\.\d+)?"  # a median of counts may fall between two
TRIPS = rf"{N} conn, {N} chan(, {N} EC2)?( \(reported: {N} conn, {N} chan\))?"


def test_the_quick_run_writes_a_row_with_numbers_for_every_case_and_path(tmp_path):
    section, info, done = quick_run_into_docs(BENCH, tmp_path / "benchmarks.md", SECTION_START, SECTION_END)
    rows = table_rows(section, "case")
    quick = Sizes(files=20, big=4 * 2**20, changed=10)
    expected = [(case.label, via) for case in build_cases(quick) for via in ("`AWSEC2`", "`crimpl`")]
    assert [(row[0], row[1]) for row in rows] == expected
    for row in rows:
        assert len(row) == 10, row
        for index, pattern in NUMBER_CELLS.items():
            assert re.fullmatch(pattern, row[index]), (row[0], index, row[index])
        assert row[7] in ("met", "**missed**"), row
        assert re.fullmatch(TRIPS, row[8]) and re.fullmatch(TRIPS, row[9]), row
    assert "python3 benchmarks/bench_user.py --quick" in section
    assert "nproc = " in section and "import crimpl.cli" in section

    # Every server it started is gone, and so is its work folder.
    assert set(info["pids"]) == {"sshd", "moto_server", "proxy"}
    servers_stopped(info["pids"])
    work = re.search(r"sandbox ready in (\S+):", done.stdout).group(1)
    assert not Path(work).exists()


def test_an_interrupted_run_stops_every_server_it_started():
    pids, work = interrupt_once_ready(BENCH)
    servers_stopped(pids)
    assert not work.exists()
