// Packing for the fast kernels: each nn.Linear matrix [out, in] is copied once into panels of 16
// outputs, k-major ([panel][k][16]), so fast::linear's micro-kernel streams contiguous panels and
// broadcasts activations. PackedWeights keeps one packed copy per weight of a model, keyed by the
// weight's address (ModelWeights::for_each_linear hands each over once, before the first forward).
#pragma once
#include <cstddef>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
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
// with plain vectors and 101 with glibc's heap on huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1).
// A buffer of 2 MB or more gets pages of its own; smaller ones are cut from shared 2 MB-page blocks
// (HugePageArena). Small buffers are most of a reduced model: every minimind2 q8 matrix is below
// 2 MB, and on 4 KB pages they cost each GEMV job a fixed ~28 us of TLB misses (measured: a 768 x 768
// bf16 GEMV streamed 22 GB/s against 46 for a plain read; q8 decode read 0.5-0.6 of the bandwidth).
constexpr size_t kHugePage = size_t(2) << 20;

inline void* huge_page_block(size_t bytes) {  // bytes: a multiple of kHugePage
    void* p = std::aligned_alloc(kHugePage, bytes);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KB
#endif
    return p;
}

// Buffers below 2 MB, cut one after another (64-byte aligned) from blocks of kBlock bytes on 2 MB
// pages; a block is freed when its last buffer is (the current block is kept for the next ones).
// One per process (per reload of these headers), never destroyed: buffers may outlive static
// destruction.
class HugePageArena {
public:
    static constexpr size_t kBlock = 16 * kHugePage;
    static HugePageArena& instance() {
        static HugePageArena* arena = new HugePageArena();
        return *arena;
    }
    void* allocate(size_t bytes) {
        bytes = (bytes + 63) / 64 * 64;
        std::lock_guard<std::mutex> lock(mutex_);
        if (current_ == nullptr || blocks_[current_].used + bytes > kBlock) {
            current_ = static_cast<char*>(huge_page_block(kBlock));
            blocks_[current_] = Block{};
        }
        Block& block = blocks_[current_];
        void* p = current_ + block.used;
        block.used += bytes;
        ++block.live;
        return p;
    }
    void deallocate(void* p) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = std::prev(blocks_.upper_bound(static_cast<char*>(p)));  // the block that holds p
        if (--it->second.live > 0) return;
        if (it->first == current_) {
            it->second.used = 0;  // empty: start it again
        } else {
            std::free(it->first);
            blocks_.erase(it);
        }
    }

    size_t blocks() {  // blocks held now (tests)
        std::lock_guard<std::mutex> lock(mutex_);
        return blocks_.size();
    }

private:
    struct Block {
        size_t used = 0, live = 0;
    };
    std::mutex mutex_;
    std::map<char*, Block> blocks_;  // by base address
    char* current_ = nullptr;
};

template <class T>
struct HugePageAllocator {
    using value_type = T;
    HugePageAllocator() = default;
    template <class U>
    HugePageAllocator(const HugePageAllocator<U>&) {}
    static size_t rounded(size_t n) { return (n * sizeof(T) + kHugePage - 1) / kHugePage * kHugePage; }
    T* allocate(size_t n) {
        if (n * sizeof(T) < kHugePage) return static_cast<T*>(HugePageArena::instance().allocate(n * sizeof(T)));
        return static_cast<T*>(huge_page_block(rounded(n)));
    }
    void deallocate(T* p, size_t n) {
        if (n * sizeof(T) < kHugePage) HugePageArena::instance().deallocate(p);
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
