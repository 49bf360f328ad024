// The thread pool of the fast kernels: persistent workers (the caller is thread 0) that spin
// briefly between jobs, then sleep; a job is a function pointer + context, so a dispatch
// allocates nothing.
//
// Work is handed out dynamically, from home ranges: a job's chunks are split into one contiguous
// range per thread, and each thread claims its own range's chunks in order from the front; a thread
// whose range is done steals from the back of the others'. Each range is one 64-bit word (job number,
// next chunk, end), claimed with one compare-and-swap. The caller never waits for a worker that has
// not started: when the cores are shared and a worker is descheduled (or still asleep), the caller
// runs its own range, then steals the rest and returns; the late worker finds nothing left to claim
// and never touches the finished job. The caller only waits for chunks already claimed and running.
// Why home ranges: a thread that claims the chunk after its last one keeps streaming through
// adjacent memory. With one shared counter (the former design) the two threads took alternate
// chunks, and every chunk restarted the stream of weights from DRAM: a decode GEMV lost ~1 us per
// chunk, 8-10% of a minimind2 bf16 decode step (measured on an Intel Xeon).
// (The design before that, one fixed share per thread and a caller spinning until every worker had
// answered, collapsed under load: a descheduled worker held the caller for a whole time slice.)
//
// It lives outside CELERINFER_NS and is compiled once per process: every reloaded version of the
// kernels shares it. (Under cling, std::thread cannot be instantiated again after a compile error
// has been rolled back, so a version compiled after a failed reload could not start threads.)
// Edits to this file therefore take effect in a new process, not on reload().
#ifndef CELERINFER_THREADPOOL_HPP
#define CELERINFER_THREADPOOL_HPP
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace celerinfer_runtime {

class ThreadPool {
public:
    static ThreadPool& instance() {
        static ThreadPool* pool = new ThreadPool();  // never destroyed: workers sleep until exit
        return *pool;
    }
    int threads() const { return n_threads_; }
    void set_threads(int n) {
        if (n < 1 || n > 256) throw std::runtime_error("threads must be 1..256, got " + std::to_string(n));
        std::lock_guard<std::mutex> busy(busy_);  // not while a job runs
        while (int(workers_.size()) < n - 1) {
            const int index = int(workers_.size()) + 1;
            // The job number is read here, not in the new thread: a job started before the thread
            // runs must still count as new to it.
            workers_.emplace_back(&ThreadPool::worker, this, index, job_of(state_.load()));
            workers_.back().detach();
        }
        n_threads_ = n;
    }
    // Run fn(ctx, chunk, thread) for every chunk in [0, n_chunks), spread over the threads (the
    // caller is thread 0; thread < threads(), and no two running chunks share a thread index), and
    // wait for them. A call made while the pool is busy (from another thread, or from inside a job)
    // runs every chunk on its own thread instead, as thread 0.
    void run(void (*fn)(void*, int, int), void* ctx, int n_chunks) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock() || n_threads_ == 1 || n_chunks < 2) {
            for (int c = 0; c < n_chunks; ++c) fn(ctx, c, 0);
            return;
        }
        if (n_chunks > kMaxChunks) throw std::runtime_error("ThreadPool::run: too many chunks");
        fn_ = fn;
        ctx_ = ctx;
        done_.store(0, std::memory_order_relaxed);
        job_ = (job_ + 1) & kJobMask;
        const int64_t T = n_threads_;
        for (int64_t t = 0; t < T; ++t)  // thread t's home: chunks [n * t / T, n * (t + 1) / T)
            ranges_[t].word.store(pack_range(job_, int(n_chunks * t / T), int(n_chunks * (t + 1) / T)),
                                  std::memory_order_release);
        state_.store(pack(job_, n_threads_ - 1), std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            { std::lock_guard<std::mutex> lock(mutex_); }
            cv_.notify_all();
        }
        int c;
        while (claim(job_, 0, c)) {
            fn(ctx, c, 0);
            done_.fetch_add(1, std::memory_order_release);
        }
        // Every chunk is claimed; wait only for those still running on a worker. Yield now and
        // then: that worker may be waiting for this very core.
        for (int spins = 1; done_.load(std::memory_order_acquire) != n_chunks; ++spins) {
            pause();
            if (spins % 64 == 0) std::this_thread::yield();
        }
    }
    // Split [0, n) into contiguous chunks (up to 8 per thread) handed out dynamically, each thread
    // taking its own share's chunks in order first: f(begin, end, thread). With parallel false, or
    // n < 2, one call f(0, n, 0) on the caller.
    template <class F>
    void parallel_for(int n, F&& f, bool parallel = true) {
        if (!parallel || n_threads_ == 1 || n < 2) return f(0, n, 0);
        const int chunks = std::min({n, 8 * n_threads_, kMaxChunks});
        struct Ctx { std::remove_reference_t<F>* f; int n, chunks; } ctx{&f, n, chunks};
        run([](void* c, int chunk, int thread) {
                auto* x = static_cast<Ctx*>(c);
                const int begin = int(int64_t(x->n) * chunk / x->chunks);
                const int end = int(int64_t(x->n) * (chunk + 1) / x->chunks);
                if (begin < end) (*x->f)(begin, end, thread);
            }, &ctx, chunks);
    }

private:
    // state_: job number (24 bits) | highest thread index allowed (8). A range: job number (24 bits)
    // | next chunk (20) | end (20); its owner takes `next` (next + 1), a thief takes end - 1.
    static constexpr int kMaxThreads = 256;
    static constexpr int kMaxChunks = (1 << 20) - 1;
    static constexpr uint32_t kJobMask = 0xFFFFFF;
    static uint64_t pack(uint32_t job, int top) { return (uint64_t(job) << 40) | (uint64_t(top) << 32); }
    static uint32_t job_of(uint64_t s) { return uint32_t(s >> 40); }
    static int top_of(uint64_t s) { return int((s >> 32) & 0xFF); }
    static uint64_t pack_range(uint32_t job, int next, int end) {
        return (uint64_t(job) << 40) | (uint64_t(next) << 20) | uint64_t(end);
    }
    struct alignas(64) Range {  // a cache line each: the owner's claims do not bounce the others'
        std::atomic<uint64_t> word{0};
    };
    // Take a chunk of `range` for job `job`: its first (the owner) or its last (a thief).
    static bool take(Range& range, uint32_t job, bool owner, int& chunk) {
        uint64_t w = range.word.load(std::memory_order_acquire);
        for (;;) {
            if (job_of(w) != job) return false;
            const int next = int((w >> 20) & kMaxChunks), end = int(w & kMaxChunks);
            if (next >= end) return false;
            const uint64_t taken = owner ? w + (uint64_t(1) << 20) : w - 1;
            if (range.word.compare_exchange_weak(w, taken, std::memory_order_acq_rel, std::memory_order_acquire)) {
                chunk = owner ? next : end - 1;
                return true;
            }
        }
    }
    // Claim a chunk of job `job` for thread `index`: its own range's next, else the last of another
    // thread's (index + 1's first, and so on round); false when that job is over, fully claimed, or
    // runs on fewer threads than index + 1. (The thread count is read once, not at the CAS: only a
    // thread stalled across 2^24 jobs, while the count dropped, could claim with too high an index.)
    bool claim(uint32_t job, int index, int& chunk) {
        const uint64_t s = state_.load(std::memory_order_acquire);
        const int top = top_of(s);
        if (job_of(s) != job || index > top) return false;
        if (take(ranges_[index], job, true, chunk)) return true;
        for (int i = 1; i <= top; ++i)
            if (take(ranges_[(index + i) % (top + 1)], job, false, chunk)) return true;
        return false;
    }
    ThreadPool() { set_threads(std::max(1u, std::thread::hardware_concurrency())); }
    static void pause() {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    void worker(int index, uint32_t seen) {
        for (;;) {
            const auto spin_start = std::chrono::steady_clock::now();
            int spins = 0;
            while (job_of(state_.load(std::memory_order_acquire)) == seen) {
                pause();
                if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - spin_start > std::chrono::microseconds(500)) {
                    sleepers_.fetch_add(1, std::memory_order_seq_cst);  // idle: sleep until the next job
                    {
                        std::unique_lock<std::mutex> lock(mutex_);
                        cv_.wait(lock, [&] { return job_of(state_.load(std::memory_order_seq_cst)) != seen; });
                    }
                    sleepers_.fetch_sub(1, std::memory_order_relaxed);
                }
            }
            seen = job_of(state_.load(std::memory_order_acquire));
            int c;
            while (claim(seen, index, c)) {  // fn_ and ctx_ are only read for a claimed chunk
                fn_(ctx_, c, index);
                done_.fetch_add(1, std::memory_order_release);
            }
        }
    }
    std::vector<std::thread> workers_;
    int n_threads_ = 1;
    uint32_t job_ = 0;  // the caller's copy of the current job number (under busy_)
    void (*fn_)(void*, int, int) = nullptr;
    void* ctx_ = nullptr;
    std::atomic<uint64_t> state_{0};
    std::unique_ptr<Range[]> ranges_{new Range[kMaxThreads]};  // thread t's home range of the current job
    std::atomic<int> done_{0};
    std::atomic<int> sleepers_{0};
    std::mutex mutex_;  // guards the sleep of idle workers
    std::condition_variable cv_;
    std::mutex busy_;   // held by the caller of run() for the whole job
};

}  // namespace celerinfer_runtime

#endif  // CELERINFER_THREADPOOL_HPP
