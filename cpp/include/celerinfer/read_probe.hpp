// The read bandwidth the kernels' own thread pool gets at this moment. bench times it in the same
// decode rounds as the kernel sets: decode streams every weight once per token, and a shared
// machine's bandwidth drifts by a quarter within a minute, so "the fraction of the read bandwidth a
// decode reaches" compares two figures of one moment only when both are measured together.
#pragma once
#include <algorithm>
#include <cstddef>

#include "fast.hpp"

namespace CELERINFER_NS {
namespace fast {

// The sum of p[0, n): the pool's threads each read a contiguous share (64-float steps, four vector
// sums, so loads and not adds bound it), as the decode GEMV streams its panels.
inline double read_sum(const float* p, size_t n) {
    constexpr int kMaxParts = 256;
    double part_sums[kMaxParts] = {};
    const int parts = std::min(num_threads(), kMaxParts);
    ThreadPool::instance().parallel_for(parts, [&](int begin, int end, int) {
        for (int t = begin; t < end; ++t) {
            const size_t a = n * t / parts / 64 * 64, b = t + 1 == parts ? n : n * (t + 1) / parts / 64 * 64;
            vf16 s0{}, s1{}, s2{}, s3{};
            size_t i = a;
            for (; i + 64 <= b; i += 64) {
                s0 += vload(p + i);
                s1 += vload(p + i + 16);
                s2 += vload(p + i + 32);
                s3 += vload(p + i + 48);
            }
            double s = vsum((s0 + s1) + (s2 + s3));
            for (; i < b; ++i) s += p[i];
            part_sums[t] = s;
        }
    });
    double total = 0;
    for (int t = 0; t < parts; ++t) total += part_sums[t];
    return total;
}

}  // namespace fast
}  // namespace CELERINFER_NS
