// Packing for the fast kernels: each nn.Linear matrix [out, in] is copied once into panels of 16
// outputs, k-major ([panel][k][16]), so fast::linear's micro-kernel streams contiguous panels and
// broadcasts activations. PackedWeights keeps one packed copy per weight of a model, keyed by the
// weight's address (ModelWeights::for_each_linear hands each over once, before the first forward).
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>
#include <unordered_map>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "check.hpp"

namespace CELERINFER_NS {
namespace fast {

// Packed weights live on 2 MB pages where the kernel offers them (transparent huge pages, often in
// "madvise" mode: only memory that asks gets them). Decode streams every weight once per token, and
// on 4 KB pages TLB misses bound that stream, not DRAM: minimind2's float32 decode ran at 77 tok/s
// with plain vectors and 101 with glibc's heap on huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1),
// two processes measured one after the other. Where a plain std::vector landed depended on the
// process's heap, so bench figures moved by a third between runs. Below 2 MB a buffer gains nothing
// and is allocated as usual (64-byte aligned).
template <class T>
struct HugePageAllocator {
    using value_type = T;
    static constexpr size_t kHugePage = size_t(2) << 20;
    HugePageAllocator() = default;
    template <class U>
    HugePageAllocator(const HugePageAllocator<U>&) {}
    static size_t rounded(size_t n) { return (n * sizeof(T) + kHugePage - 1) / kHugePage * kHugePage; }
    T* allocate(size_t n) {
        if (n * sizeof(T) < kHugePage) return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
        void* p = std::aligned_alloc(kHugePage, rounded(n));
        if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(p, rounded(n), MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KB
#endif
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t n) {
        if (n * sizeof(T) < kHugePage) ::operator delete(p, std::align_val_t(64));
        else std::free(p);
    }
};
template <class T, class U>
bool operator==(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return true; }
template <class T, class U>
bool operator!=(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return false; }

// A buffer of packed weights (see HugePageAllocator).
template <class T>
using WeightBuffer = std::vector<T, HugePageAllocator<T>>;

struct PackedMatrix {
    int out = 0, in = 0, panels = 0;
    WeightBuffer<float> data;  // [panel][k][16], outputs past `out` are zero
};

inline PackedMatrix pack(const float* W, int out, int in) {
    PackedMatrix P;
    P.out = out;
    P.in = in;
    P.panels = (out + 15) / 16;
    P.data.assign(size_t(P.panels) * in * 16, 0.0f);
    for (int o = 0; o < out; ++o)
        for (int k = 0; k < in; ++k) P.data[(size_t(o / 16) * in + k) * 16 + o % 16] = W[size_t(o) * in + k];
    return P;
}

}  // namespace fast

// Every linear weight of a model, packed once for the fast GEMM (keyed by the weight's address).
struct PackedWeights {
    std::unordered_map<const float*, fast::PackedMatrix> packed;
    void add(const float* W, int out, int in) {
        if (W && !packed.count(W)) packed[W] = fast::pack(W, out, in);
    }
    const fast::PackedMatrix& at(const float* W, int out, int in) const {
        auto it = packed.find(W);
        CI_CHECK(it != packed.end(), "fast kernels: a weight was not packed (was the model rebound after packing?)");
        CI_CHECK(it->second.in == in && it->second.out == out, "fast kernels: packed shape mismatch");
        return it->second;
    }
};

}  // namespace CELERINFER_NS
