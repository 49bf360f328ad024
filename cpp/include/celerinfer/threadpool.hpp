// The thread pool of the fast kernels: persistent workers (the caller is thread 0) that spin
// briefly between jobs, then sleep; a job is a function pointer + context, so a dispatch
// allocates nothing.
//
// Work is handed out dynamically: a job is cut into chunks and every thread, the caller included,
// claims the next unclaimed chunk with one compare-and-swap on a single 64-bit word (job number,
// thread count, chunk count, next chunk). The caller never waits for a worker that has not started:
// when the cores are shared and a worker is descheduled (or still asleep), the caller simply runs
// the remaining chunks itself and returns; the late worker finds nothing left to claim and never
// touches the finished job. The caller only waits for chunks already claimed and running.
// (The former design, one fixed share per thread and a caller spinning until every worker had
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
        state_.store(pack(job_, n_threads_ - 1, n_chunks, 0), std::memory_order_seq_cst);
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
    // Split [0, n) into contiguous chunks (up to 8 per thread) handed out dynamically:
    // f(begin, end, thread). With parallel false, or n < 2, one call f(0, n, 0) on the caller.
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
    // state_: job number (24 bits) | highest thread index allowed (8) | chunks (16) | next chunk (16)
    static constexpr int kMaxChunks = 0xFFFF;
    static constexpr uint32_t kJobMask = 0xFFFFFF;
    static uint64_t pack(uint32_t job, int top, int chunks, int next) {
        return (uint64_t(job) << 40) | (uint64_t(top) << 32) | (uint64_t(chunks) << 16) | uint64_t(next);
    }
    static uint32_t job_of(uint64_t s) { return uint32_t(s >> 40); }
    // Claim the next chunk of job `job` for thread `index`: false when that job is over, fully
    // claimed, or runs on fewer threads than index + 1.
    bool claim(uint32_t job, int index, int& chunk) {
        uint64_t s = state_.load(std::memory_order_acquire);
        for (;;) {
            if (job_of(s) != job || index > int((s >> 32) & 0xFF)) return false;
            const int next = int(s & 0xFFFF), chunks = int((s >> 16) & 0xFFFF);
            if (next >= chunks) return false;
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                chunk = next;
                return true;
            }
        }
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
    std::atomic<int> done_{0};
    std::atomic<int> sleepers_{0};
    std::mutex mutex_;  // guards the sleep of idle workers
    std::condition_variable cv_;
    std::mutex busy_;   // held by the caller of run() for the whole job
};

}  // namespace celerinfer_runtime

#endif  // CELERINFER_THREADPOOL_HPP
