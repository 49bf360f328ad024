// machine_limits: what this CPU can do, measured (`celerinfer-lab machine` builds and runs it; the
// profile's roofline reads the result). Prints one JSON object:
//   fma_gflops_1 / fma_gflops_all    float32 FMA peak, one thread / THREADS threads: a register-blocked
//                                     loop of independent FMAs (16 vector accumulators, 2 FMAs each
//                                     iteration), the widest vectors this build has (AVX-512, else AVX2+FMA)
//   read_gbs_dram_1 / _all           read bandwidth from a buffer of DRAM_MB (>> L3), 1 / THREADS threads
//   read_gbs_cache_1 / _all          read bandwidth from a CACHE_KB buffer per thread (L2-sized), re-read
//   features                         cpuid (cpu.hpp): fma, avx2, avx512f, avx512bw, avx512_bf16, avx512_vnni, amx
// Each figure is the best of REPEATS runs of about SECONDS each.
//
//   g++ -O2 -march=native -std=c++17 -Icpp/include cpp/tools/machine_limits.cpp -o machine_limits -pthread
//   ./machine_limits THREADS SECONDS REPEATS DRAM_MB CACHE_KB
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "celerinfer/cpu.hpp"
#include "celerinfer/packing.hpp"

namespace ci = celerinfer;
using Clock = std::chrono::steady_clock;

#if defined(__AVX512F__)
using Vec = __m512;
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vec vset(float x) { return _mm512_set1_ps(x); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
static const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec vset(float x) { return _mm256_set1_ps(x); }
static inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
static const char* kIsa = "avx2+fma";
#else
#error "machine_limits needs AVX2+FMA or AVX-512 (-march=native on an x86-64 that has them)"
#endif
constexpr int kLanes = int(sizeof(Vec) / sizeof(float));
constexpr int kAcc = 16;  // independent chains: more than FMA latency x FMA ports on any x86 so far

static inline float vsum(Vec a) {
    alignas(64) float t[kLanes];
    std::memcpy(t, &a, sizeof a);
    float s = 0;
    for (int i = 0; i < kLanes; ++i) s += t[i];
    return s;
}

// FMAs on kAcc accumulators for `iters` iterations: 2 * kAcc * kLanes * 2 flops per iteration.
static float fma_loop(long iters, float seed) {
    Vec acc[kAcc];
    for (int j = 0; j < kAcc; ++j) acc[j] = vset(seed + j);
    const Vec a = vset(0.999999f), b = vset(1e-7f);
    for (long i = 0; i < iters; ++i) {  // unrolled, so the accumulators live in registers
#pragma GCC unroll 16
        for (int j = 0; j < kAcc; ++j) acc[j] = vfma(acc[j], a, b);
#pragma GCC unroll 16
        for (int j = 0; j < kAcc; ++j) acc[j] = vfma(acc[j], a, b);
    }
    Vec s = acc[0];
    for (int j = 1; j < kAcc; ++j) s = vadd(s, acc[j]);
    return vsum(s);
}

// Sum of n floats (n a multiple of 4 * kLanes): four independent vector sums, so loads, not adds, bound it.
static float read_sum(const float* p, size_t n) {
    Vec s0 = vset(0), s1 = vset(0), s2 = vset(0), s3 = vset(0);
    for (size_t i = 0; i < n; i += 4 * kLanes) {
        s0 = vadd(s0, vload(p + i));
        s1 = vadd(s1, vload(p + i + kLanes));
        s2 = vadd(s2, vload(p + i + 2 * kLanes));
        s3 = vadd(s3, vload(p + i + 3 * kLanes));
    }
    return vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
}

static volatile float g_sink;

// The compiler may not assume memory unchanged across this: every pass re-reads the buffer.
static inline void clobber() { asm volatile("" ::: "memory"); }

// Run work(t) on `threads` threads at once (thread 0 is this one); the wall seconds of the slowest.
template <class Work>
static double run_threads(int threads, Work work) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<double> secs(threads);
    auto body = [&](int t) {
        ready.fetch_add(1);
        while (!go.load()) {
        }
        const auto t0 = Clock::now();
        work(t);
        secs[t] = std::chrono::duration<double>(Clock::now() - t0).count();
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
    while (ready.load() < threads - 1) {
    }
    ready.fetch_add(1);
    go.store(true);
    body(0);
    for (auto& th : pool) th.join();
    double worst = 0;
    for (double s : secs) worst = s > worst ? s : worst;
    return worst;
}

static double fma_gflops(int threads, double seconds, int repeats) {
    long iters = 1 << 16;  // calibrate on one thread: about `seconds` per run
    for (;;) {
        const auto t0 = Clock::now();
        g_sink = fma_loop(iters, 1.0f);
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        if (s > seconds / 4 || iters > (1L << 40)) {
            iters = long(double(iters) * seconds / s) + 1;
            break;
        }
        iters *= 4;
    }
    double best = 0;
    for (int r = 0; r < repeats; ++r) {
        const double s = run_threads(threads, [&](int t) { g_sink = fma_loop(iters, 1.0f + t); });
        const double gflops = double(threads) * iters * 2.0 * kAcc * kLanes * 2.0 / s * 1e-9;
        best = gflops > best ? gflops : best;
    }
    return best;
}

// Each thread reads its own `per_thread` floats `passes` times (after touching them once).
static double read_gbs(int threads, size_t per_thread, double seconds, int repeats) {
    per_thread = per_thread / (4 * kLanes) * (4 * kLanes);
    std::vector<float*> bufs(threads);
    run_threads(threads, [&](int t) {  // first touch by the thread that reads it
        // On 2 MB pages, as the packed weights are (packing.hpp): with 4 KB pages the TLB misses, not
        // DRAM, bound a sequential read (measured here: 26 GB/s on 2 threads, against 36-37 on 2 MB
        // pages), and the decode GEMV ran above that "limit".
        bufs[t] = ci::fast::HugePageAllocator<float>().allocate(per_thread);
        for (size_t i = 0; i < per_thread; ++i) bufs[t][i] = float(i & 1023) * 1e-3f;
    });
    int passes = 1;
    for (;;) {
        const double s = run_threads(1, [&](int) {
            for (int p = 0; p < passes; ++p) {
                g_sink = read_sum(bufs[0], per_thread);
                clobber();
            }
        });
        if (s > seconds / 4 || passes > (1 << 24)) {
            passes = int(double(passes) * seconds / s) + 1;
            break;
        }
        passes *= 4;
    }
    double best = 0;
    for (int r = 0; r < repeats; ++r) {
        const double s = run_threads(threads, [&](int t) {
            float sum = 0;
            for (int p = 0; p < passes; ++p) {
                sum += read_sum(bufs[t], per_thread);
                clobber();
            }
            g_sink = sum;
        });
        const double gbs = double(threads) * passes * per_thread * sizeof(float) / s * 1e-9;
        best = gbs > best ? gbs : best;
    }
    for (float* b : bufs) ci::fast::HugePageAllocator<float>().deallocate(b, per_thread);
    return best;
}

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: machine_limits THREADS SECONDS REPEATS DRAM_MB CACHE_KB\n");
        return 2;
    }
    const int threads = std::atoi(argv[1]), repeats = std::atoi(argv[3]);
    const double seconds = std::atof(argv[2]);
    const long dram_mb = std::atol(argv[4]), cache_kb = std::atol(argv[5]);
    if (threads < 1 || threads > 1024 || !(seconds > 0 && seconds < 60) || repeats < 1 || repeats > 100 ||
        dram_mb < 1 || dram_mb > (1L << 20) || cache_kb < 4 || cache_kb > (1L << 20)) {
        std::fprintf(stderr, "machine_limits: THREADS 1..1024, SECONDS in (0, 60), REPEATS 1..100, DRAM_MB >= 1, "
                             "CACHE_KB >= 4\n");
        return 2;
    }
    const size_t dram = size_t(dram_mb) << 20, cache = size_t(cache_kb) << 10;
    const double f1 = fma_gflops(1, seconds, repeats), fa = fma_gflops(threads, seconds, repeats);
    const double d1 = read_gbs(1, dram / sizeof(float), seconds, repeats);
    const double da = read_gbs(threads, dram / threads / sizeof(float), seconds, repeats);
    const double c1 = read_gbs(1, cache / sizeof(float), seconds, repeats);
    const double ca = read_gbs(threads, cache / sizeof(float), seconds, repeats);
    const ci::CpuFeatures& c = ci::cpu_features();
    auto b = [](bool v) { return v ? "true" : "false"; };
    std::printf(
        "{\"isa\": \"%s\", \"threads\": %d, \"fma_gflops_1\": %.2f, \"fma_gflops_all\": %.2f, "
        "\"read_gbs_dram_1\": %.2f, \"read_gbs_dram_all\": %.2f, \"read_gbs_cache_1\": %.2f, "
        "\"read_gbs_cache_all\": %.2f, \"dram_buffer_mb\": %ld, \"cache_buffer_kb\": %ld, \"features\": {\"fma\": %s, "
        "\"avx2\": %s, \"avx512f\": %s, \"avx512bw\": %s, \"avx512_bf16\": %s, \"avx512_vnni\": %s, \"amx_tile\": %s, "
        "\"amx_bf16\": %s, \"amx_int8\": %s}}\n",
        kIsa, threads, f1, fa, d1, da, c1, ca, dram_mb, cache_kb, b(c.fma), b(c.avx2), b(c.avx512f), b(c.avx512bw),
        b(c.avx512_bf16), b(c.avx512_vnni), b(c.amx_tile), b(c.amx_bf16), b(c.amx_int8));
    return 0;
}
