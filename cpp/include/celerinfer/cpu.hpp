// What this CPU has, read with cpuid at run time: the bf16/q8 kernel sets pick their code by it
// (reduced.hpp), and cpp/tools/machine_limits.cpp reports it (`celerinfer-lab machine`).
// cpuid is read directly: __builtin_cpu_supports needs libgcc's __cpu_model, which cling (cppyy)
// cannot resolve (measured: "symbol '__cpu_model' unresolved").
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "check.hpp"

namespace CELERINFER_NS {

struct CpuFeatures {
    bool fma = false, avx2 = false, avx512f = false, avx512bw = false, avx512_bf16 = false, avx512_vnni = false;
    bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
    bool intel = false;  // the vendor string is "GenuineIntel" (tuning only: reduced.hpp's GEMV prefetch)
};
inline const CpuFeatures& cpu_features() {
    static const CpuFeatures f = [] {
        CpuFeatures c;
#if defined(__x86_64__) || defined(__i386__)
        unsigned a, b, cx, d;
        if (__get_cpuid(0, &a, &b, &cx, &d)) c.intel = b == 0x756e6547u && d == 0x49656e69u && cx == 0x6c65746eu;
        if (__get_cpuid(1, &a, &b, &cx, &d)) c.fma = cx & (1u << 12);
        if (__get_cpuid_count(7, 0, &a, &b, &cx, &d)) {
            c.avx2 = b & (1u << 5);
            c.avx512f = b & (1u << 16);
            c.avx512bw = b & (1u << 30);
            c.avx512_vnni = cx & (1u << 11);
            c.amx_bf16 = d & (1u << 22);
            c.amx_tile = d & (1u << 24);
            c.amx_int8 = d & (1u << 25);
        }
        if (__get_cpuid_count(7, 1, &a, &b, &cx, &d)) c.avx512_bf16 = a & (1u << 5);
#endif
        return c;
    }();
    return f;
}

}  // namespace CELERINFER_NS
