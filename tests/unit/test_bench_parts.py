"""The bench's arithmetic, apart from any timing: unit counting, round summaries, and the
CPU budget's /proc readings, thread groups and per-case sums."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from app.bench.cpu_budget import Window, representative, summarize_case
from app.bench.load_client import ClientRun, parse_hey
from app.bench.policies import PhotoWindow, summarize_policy
from app.bench.proc import (
    CLOCK_TICKS,
    EDGE,
    FORWARD,
    OTHER,
    PREP,
    CpuSnapshot,
    add_cpu,
    cpu_between,
    parse_schedstat,
    parse_stat,
    snapshot,
    thread_group,
)
from app.bench.server_load import HttpRound, summarize_rounds
from app.bench.timing import timed_loop
from app.threads import name_os_thread
from tests.helpers import image_bytes


def test_timed_loop_counts_units_after_one_warm_up_call() -> None:
    calls: list[int] = []

    def one() -> int:
        calls.append(1)
        return 3

    rate = timed_loop(one, duration_s=0.0, min_iters=4)
    assert len(calls) == 5 and rate > 0  # warm-up + 4 timed calls


def test_rounds_are_summed_and_latencies_pooled() -> None:
    rounds = [HttpRound(10, [0.1, 0.3], 0, 1.0), HttpRound(30, [0.2], 1, 1.0)]
    s = summarize_rounds(rounds)
    assert s["views_per_s"] == pytest.approx(20.0) and s["requests_per_s"] == pytest.approx(1.5)
    assert s["p50_ms"] == pytest.approx(200.0) and s["errors"] == 1


# -- the CPU budget: /proc readings, thread groups, hey's summary ------------------------

HEY_SUMMARY = """
Summary:
  Total:\t2.0031 secs
  Slowest:\t0.1203 secs
  Requests/sec:\t148.2690

Latency distribution:
  10% in 0.0301 secs
  50% in 0.0512 secs
  99% in 0.1100 secs

Status code distribution:
  [200]\t290 responses
  [503]\t5 responses

Error distribution:
  [2]\tPost "http://127.0.0.1:1/v1/models/m/classify": EOF
"""


def test_stat_line_is_read_past_a_name_with_spaces_and_parentheses() -> None:
    fields = ["S"] + [str(i) for i in range(4, 14)] + ["250", "50"] + ["0"] * 37
    comm, seconds = parse_stat(f"4242 (forward (x) 1) {' '.join(fields)}\n")
    assert comm == "forward (x) 1"
    assert seconds == pytest.approx(300 / CLOCK_TICKS)  # utime + stime, in clock ticks
    assert parse_schedstat("1500000000 2000 30\n") == pytest.approx(1.5)


def test_threads_are_grouped_by_os_name() -> None:
    assert thread_group(10, 10, "python") == EDGE  # the main thread runs the event loop
    assert thread_group(10, 11, "preprocess_0") == PREP
    assert thread_group(10, 12, "forward-tf_effi") == FORWARD
    assert thread_group(10, 13, "net-tf_efficien") == FORWARD  # born while loading: OpenVINO
    assert thread_group(10, 14, "python") == OTHER


def test_cpu_between_counts_new_threads_from_zero_and_keeps_the_remainder() -> None:
    before = CpuSnapshot(1, 10.0, {1: ("python", 4.0), 2: ("forward-m-1", 3.0)})
    after = CpuSnapshot(
        1, 13.0, {1: ("python", 5.0), 2: ("forward-m-1", 4.5), 3: ("preprocess_0", 0.25)}
    )
    spent = cpu_between(before, after)
    assert spent[EDGE] == pytest.approx(1.0) and spent[FORWARD] == pytest.approx(1.5)
    assert spent[PREP] == pytest.approx(0.25) and spent[OTHER] == 0.0
    assert spent["total"] == pytest.approx(3.0) and spent["unattributed"] == pytest.approx(0.25)
    assert add_cpu([spent, spent])["total"] == pytest.approx(6.0)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_named_thread_s_cpu_lands_in_its_group() -> None:
    """name_os_thread names the OS thread (cut to 15 bytes), and the CPU it burns between
    two readings of this process shows up under its group, not the main thread's."""
    seen: list[str] = []
    started, go, worked, leave = (threading.Event() for _ in range(4))

    def work() -> None:
        name_os_thread()
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())
        started.set()
        go.wait()
        sum(i * i for i in range(2_000_000))  # CPU between the two readings
        worked.set()
        leave.wait()  # alive at the second reading: an ended thread is no longer listed

    thread = threading.Thread(target=work, name="forward-a-long-model-name-1")
    thread.start()
    started.wait()
    before = snapshot(os.getpid())
    go.set()
    worked.wait()
    spent = cpu_between(before, snapshot(os.getpid()))
    leave.set()
    thread.join()
    assert seen == ["forward-a-long-\n"]
    assert spent[FORWARD] > 0 and spent["total"] > 0 and spent[PREP] == 0.0


def test_hey_summary_counts_answers_and_errors() -> None:
    ok, errors, elapsed = parse_hey(HEY_SUMMARY)
    assert (ok, errors) == (290, 7)  # a 503 and a failed request are both errors
    assert elapsed == pytest.approx(2.0031)
    with pytest.raises(ValueError):
        parse_hey("hey: connection refused")


def test_representative_photos_spread_over_pixel_counts() -> None:
    photos = [(f"{w}.png", image_bytes(w, 40, seed=w)) for w in (90, 30, 70, 50, 110, 10)]
    assert [name for name, _ in representative(photos, 3)] == ["30.png", "70.png", "110.png"]


def test_a_case_is_summarized_per_image_against_the_forward_limit() -> None:
    """Two windows of 100 answers each: per image ms, parts that add up to the total,
    outside the network both ways, and images/s as a share of raw / view-equivalents."""
    cpu = {"total": 0.5, EDGE: 0.1, PREP: 0.1, FORWARD: 0.25, OTHER: 0.0, "unattributed": 0.05}
    served = {"images": 100.0, "views": 300.0, "view_equivalents": 400.0}
    window = Window(ClientRun(100, 0, 1.0, 0.02), cpu, served)
    row = summarize_case([window, window], raw_views_per_s=800.0, forward_s_per_view=0.0005)
    assert row["requests"] == 200 and row["images_per_s"] == 100.0
    assert row["views_per_image"] == 3.0 and row["view_equivalents_per_image"] == 4.0
    assert row["server_ms"] == 5.0 and sum(row["threads_ms"].values()) == pytest.approx(5.0)
    assert row["outside_network_ms"] == 2.5  # 5 ms less the forward threads' 2.5
    assert row["outside_network_ms_by_forward_cost"] == 3.0  # 5 ms less 4 x 0.5 ms
    assert row["forward_only_limit_images_per_s"] == 200.0 and row["of_forward_limit"] == 0.5
    assert row["views_per_s"] == 300.0 and row["client_ms"] == 0.2


def test_a_policy_window_that_served_no_image_does_not_count_as_zero_views() -> None:
    """A short window can end before a request is answered: it says nothing per image, so
    the policy's views and view-equivalents per image come from the windows that served."""
    counts = {"images": 4.0, "views": 8.0, "view_equivalents": 6.0,
              "answered": 4.0, "answered_by_later": 1.0}  # fmt: skip
    served = PhotoWindow(ClientRun(ok=4, errors=0, elapsed_s=1.0, cpu_s=0.1), counts)
    empty = PhotoWindow(ClientRun(ok=0, errors=0, elapsed_s=0.03, cpu_s=0.0),
                        dict.fromkeys(counts, 0.0))  # fmt: skip
    row = summarize_policy([[served, empty], [served]])
    assert row["views_per_image"] == 2.0 and row["view_equivalents_per_image"] == 1.5
    assert row["answered_by_later_share"] == 0.25 and row["requests"] == 8
    assert summarize_policy([[empty]])["view_equivalents_per_image"] == 0.0
