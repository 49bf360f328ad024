// The thread pool of the fast kernels: persistent workers (the caller is worker 0) that spin
// briefly between jobs, then sleep; a job is a function pointer + context, so a dispatch
// allocates nothing.
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
            // The generation is read here, not in the new thread: a job started before the thread
            // runs must still count as new to it.
            workers_.emplace_back(&ThreadPool::worker, this, index, generation_.load());
            workers_.back().detach();
        }
        n_threads_ = n;
    }
    // Run fn(ctx, thread_index, n_threads) on every thread (the caller is thread 0) and wait.
    // A call made while the pool is busy (from another thread, or from inside a job) runs the
    // whole job on its own thread instead: fn(ctx, 0, 1).
    void run(void (*fn)(void*, int, int), void* ctx) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock() || n_threads_ == 1) return fn(ctx, 0, 1);
        fn_ = fn;
        ctx_ = ctx;
        active_ = n_threads_;
        // Every worker answers every job, also those beyond n_threads_ after set_threads lowered
        // it (they run nothing): counting only the active ones would let pending_ go below zero.
        pending_.store(int(workers_.size()), std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        fn(ctx, 0, n_threads_);
        while (pending_.load(std::memory_order_acquire) != 0) pause();
    }
    // Split [0, n) into contiguous chunks, one per thread: f(begin, end, thread).
    template <class F>
    void parallel_for(int n, F&& f, bool parallel = true) {
        if (!parallel || n_threads_ == 1 || n < 2) return f(0, n, 0);
        struct Ctx { std::remove_reference_t<F>* f; int n; } ctx{&f, n};
        run([](void* c, int t, int nt) {
                auto* x = static_cast<Ctx*>(c);
                const int begin = int(int64_t(x->n) * t / nt), end = int(int64_t(x->n) * (t + 1) / nt);
                if (begin < end) (*x->f)(begin, end, t);
            }, &ctx);
    }

private:
    ThreadPool() { set_threads(std::max(1u, std::thread::hardware_concurrency())); }
    static void pause() {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    void worker(int index, int seen) {
        for (;;) {
            auto spin_start = std::chrono::steady_clock::now();
            int spins = 0;
            while (generation_.load(std::memory_order_acquire) == seen) {
                pause();
                if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - spin_start > std::chrono::milliseconds(2)) {
                    std::unique_lock<std::mutex> lock(mutex_);  // idle: sleep until the next job
                    cv_.wait(lock, [&] { return generation_.load() != seen; });
                }
            }
            seen = generation_.load(std::memory_order_acquire);
            if (index < active_) fn_(ctx_, index, active_);
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }
    std::vector<std::thread> workers_;
    int n_threads_ = 1;
    int active_ = 1;
    void (*fn_)(void*, int, int) = nullptr;
    void* ctx_ = nullptr;
    std::atomic<int> generation_{0};
    std::atomic<int> pending_{0};
    std::mutex mutex_;  // guards the sleep of idle workers
    std::condition_variable cv_;
    std::mutex busy_;   // held by the caller of run() for the whole job
};

}  // namespace celerinfer_runtime

#endif  // CELERINFER_THREADPOOL_HPP
