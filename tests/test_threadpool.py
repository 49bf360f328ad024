"""The fast kernels' thread pool hands out work by home ranges (threadpool.hpp): each thread runs the
chunks of its own contiguous share in order, from the front, and only then steals from the back of
another thread's share. A decode GEMV streams its weights from DRAM; a thread that jumps between
chunks restarts that stream (measured: 8-10% of a minimind2 bf16 decode step on an Intel Xeon).

Checked on the real pool, through many jobs (which thread claims what changes from job to job):
every item runs exactly once; a thread's chunks of its own share are a prefix of that share, in
order; the rest of the share went to other threads, each taking the last chunk left.
"""

import cppyy
import pytest

RECORDER = """
#include <vector>
namespace celerinfer_pool_test {
// For each of `jobs` parallel_for(n) calls: per thread, its count of calls, then each call's begin and end.
inline std::vector<int> record(int n, int jobs) {
    auto& pool = celerinfer_runtime::ThreadPool::instance();
    std::vector<int> flat;
    for (int job = 0; job < jobs; ++job) {
        std::vector<std::vector<int>> calls(pool.threads());
        pool.parallel_for(n, [&](int begin, int end, int thread) {
            volatile double spin = 0;  // a little work, so that both threads get some
            for (int i = 0; i < 2000 * (end - begin); ++i) spin = spin + i;
            calls[thread].push_back(begin);
            calls[thread].push_back(end);
        });
        for (const auto& c : calls) {
            flat.push_back(int(c.size() / 2));
            flat.insert(flat.end(), c.begin(), c.end());
        }
    }
    return flat;
}
}
"""


def _jobs(flat: list[int], threads: int, jobs: int) -> list[list[list[tuple[int, int]]]]:
    """The recorder's output as [job][thread] -> [(begin, end), ...] in the order run."""
    out, i = [], 0
    for _ in range(jobs):
        per_thread = []
        for _ in range(threads):
            count = flat[i]
            per_thread.append([(flat[i + 1 + 2 * k], flat[i + 2 + 2 * k]) for k in range(count)])
            i += 1 + 2 * count
        out.append(per_thread)
    assert i == len(flat)
    return out


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 7, 48, 200])
def test_each_thread_runs_its_own_share_in_order_then_steals_from_the_back(native, threads, n):
    if not hasattr(cppyy.gbl, "celerinfer_pool_test"):
        cppyy.cppdef(RECORDER)
    jobs = 60
    before = native.threads
    native.set_threads(threads)
    try:
        record = _jobs(list(cppyy.gbl.celerinfer_pool_test.record(n, jobs)), threads, jobs)
    finally:
        native.set_threads(before)
    chunks = min(n, 8 * threads) if threads > 1 else 1
    bounds = [(n * c // chunks, n * (c + 1) // chunks) for c in range(chunks)]
    home = [bounds[chunks * t // threads : chunks * (t + 1) // threads] for t in range(threads)]
    stolen_somewhere = False
    for job, per_thread in enumerate(record):
        ran = sorted(call for calls in per_thread for call in calls)
        assert ran == bounds, f"job {job}: the chunks run are not each chunk once: {ran}"
        for t, calls in enumerate(per_thread):
            own = [c for c in calls if c in home[t]]
            assert own == home[t][: len(own)], f"job {job}, thread {t}: its own chunks out of order: {own}"
            thieves = [c for u, others in enumerate(per_thread) if u != t for c in others if c in home[t]]
            assert sorted(thieves) == home[t][len(own) :], f"job {job}: thread {t}'s chunks stolen not from the back"
            for u, others in enumerate(per_thread):  # each thief takes the last chunk left: descending
                taken = [c for c in others if c in home[t]] if u != t else []
                assert taken == sorted(taken, reverse=True), f"job {job}: thread {u} stole {taken} from thread {t}"
            stolen_somewhere |= bool(thieves)
    if threads == 1:
        assert all(per_thread[0] == [(0, n)] for per_thread in record)  # one call on the caller
    print(f"\n{threads} threads, {n} items: some chunk stolen in {jobs} jobs: {stolen_somewhere}")
