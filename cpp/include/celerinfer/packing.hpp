// Packing for the fast kernels: each nn.Linear matrix [out, in] is copied once into panels of 16
// outputs, k-major ([panel][k][16]), so fast::linear's micro-kernel streams contiguous panels and
// broadcasts activations. PackedWeights keeps one packed copy per weight of a model, keyed by the
// weight's address (ModelWeights::for_each_linear hands each over once, before the first forward).
#pragma once
#include <cstddef>
#include <unordered_map>
#include <vector>

#include "check.hpp"

namespace CELERINFER_NS {
namespace fast {

struct PackedMatrix {
    int out = 0, in = 0, panels = 0;
    std::vector<float> data;  // [panel][k][16], outputs past `out` are zero
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
