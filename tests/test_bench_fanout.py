"""benchmarks/bench_fanout.py runs end to end in its quick mode, writes its table, and leaves no server behind.

These tests check behaviour, never timing: every way has a row with a number in
each cell, crimpl's client bytes are the inputs once and the peers' are the
inputs once per node, the docs section is replaced in place, and the servers
end with the run, also when it is interrupted.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

from bench_runs import interrupt_once_ready, quick_run_into_docs, servers_stopped, table_rows

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_fanout.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fanout import LINK_SECTION_END, LINK_SECTION_START, SECTION_END, SECTION_START, WAYS  # noqa: E402

NODES = 4
QUICK_INPUTS = 4 * 2**20 + 20 * 8 * 2**10  # --quick: one 4 MiB file and 20 files of 8 KiB
SIZE = r"\d+\.\d (MiB|KiB)"


def test_the_quick_run_writes_a_row_with_numbers_for_every_way(tmp_path):
    section, info, done = quick_run_into_docs(BENCH, tmp_path / "benchmarks.md", SECTION_START, SECTION_END,
                                              timeout=600)
    rows = table_rows(section, "way")
    assert [row[0] for row in rows] == [label.replace("|", "\\|") for _, label in WAYS]
    for row in rows:
        assert len(row) == 6, row
        assert re.fullmatch(r"\d+\.\d\d s", row[1]), row
        assert re.fullmatch(r"\d+\.\d\d", row[2]), row  # one repeat
        assert re.fullmatch(rf"{SIZE}( \(then {SIZE} rank 0 → nodes\))?", row[3]), row
        assert re.fullmatch(r"\d+\.\d\dx", row[4]) and re.fullmatch(r"\d+\.\d\dx", row[5]), row
    assert "python3 benchmarks/bench_fanout.py --quick" in section
    assert "nproc = " in section and "Load average" in section

    # crimpl sent the inputs over the client's link once and rank 0 sent them on to each other node;
    # a peer sends them once per node.
    by_way = {row["way"]: row for row in info["rows"]}
    crimpl, parallel, sequential = by_way["crimpl"], by_way["parallel"], by_way["sequential"]
    assert QUICK_INPUTS <= crimpl["client_bytes"] < QUICK_INPUTS + 2**20
    assert crimpl["fanout_bytes"] >= (NODES - 1) * QUICK_INPUTS
    for peer in (parallel, sequential):
        assert peer["client_bytes"] >= NODES * QUICK_INPUTS
        assert peer["bytes_ratio"] > NODES - 1
    assert by_way["empty"]["client_bytes"] < 2**20
    assert crimpl["time_ratio"] == 1.0

    # Every server it started is gone, and so is its work folder.
    assert set(info["pids"]) == {"moto_server", *(f"{name}{rank}" for name in ("sshd", "proxy")
                                                  for rank in range(NODES))}
    servers_stopped(info["pids"])
    work = re.search(r"sandbox ready in (\S+):", done.stdout).group(1)
    assert not Path(work).exists()


def test_a_run_through_one_shared_uplink_writes_its_own_section_beside_the_other(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{SECTION_START}\nthe uncapped run\n{SECTION_END}\n")
    results = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--link-mbps", "200", "--out", str(docs),
                           "--json", str(results)], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = docs.read_text()
    assert f"{SECTION_START}\nthe uncapped run\n{SECTION_END}\n" in text
    section = text.split(LINK_SECTION_START, 1)[1].split(LINK_SECTION_END, 1)[0]
    assert "through one 200 Mbit/s uplink" in section
    assert [row[0] for row in table_rows(section, "way")] == [label.replace("|", "\\|") for _, label in WAYS]
    info = json.loads(results.read_text())
    # One proxy process for every node's link.
    assert set(info["pids"]) == {"moto_server", "proxy0", *(f"sshd{rank}" for rank in range(NODES))}
    assert QUICK_INPUTS <= {row["way"]: row for row in info["rows"]}["crimpl"]["client_bytes"]
    servers_stopped(info["pids"])


def test_an_interrupted_run_stops_every_server_it_started():
    pids, work = interrupt_once_ready(BENCH)
    assert len(pids) == 1 + 2 * NODES
    servers_stopped(pids)
    assert not work.exists()
