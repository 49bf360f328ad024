// Kernel sets for reduced-precision weights (model.hpp's WeightFormat): bf16 and q8 (llama.cpp's Q8_0).
//
// One rule for all four sets: each op computes the product of the *decoded* weights with the float32
// activations, to float32 precision, so the float64 reference on those decoded weights (the
// precision-matched oracle) judges it within the usual float32 floors. Mostly each weight is widened
// to float32 on the fly (bf16: a 16-bit shift; q8: int8 -> float times its block's scale, a product
// exact in float32). The q8 decode GEMV on a CPU with AVX512-VNNI instead splits each activation
// into four exact int8 digits of a per-block fixed point (30 bits: rounding at 2^-30 of the block's
// largest) and sums the products exactly in int32 with vpdpbusd: the same op, to within float32
// rounding (see "q8 decode on VNNI" below). Not used: AVX512-BF16 vdpbf16ps, which rounds the
// activations to bf16 (a different op), and llama.cpp's int8 x int8 of activations quantized to 8 bits.
//
// * ReadableBf16Kernels, ReadableQ8Kernels ("readable-bf16", "readable-q8"): per output, decode the
//   weight row into floats with plain loops, then ops.hpp's dot: the debugger's baseline.
// * Bf16Kernels, Q8Kernels ("bf16", "q8"): weights repacked at prepare into panels of 16 outputs:
//   bf16 as k pairs [panel][k/2][16][2] uint16, q8 as fast.hpp's [panel][k][16] int8 with scales
//   [panel][block][16] (and with VNNI also the GEMV's own layout); see PackedReduced. Prefill (rows > 4): each panel triple decoded once into a per-thread float32 buffer,
//   then fast::gemm_tile's arithmetic over all rows. Decode (rows <= 4): a GEMV that streams the
//   packed weights with both threads, widening in the k loop; q8 on VNNI at 1-2 rows: vpdpbusd.
//   The linears of one input (forward.hpp's linears: q, k, v; gate, up) run as one GEMV job.
//   rmsnorm, swiglu and attention are FastKernels'.
// A weight without a stored form (the MoE router) runs as in the float32 set the struct derives from.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "check.hpp"
#include "cpu.hpp"
#include "fast.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "readable.hpp"

namespace CELERINFER_NS {

// ---- decoding one weight (the readable sets, and packing) ---------------------------------------
inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = uint32_t(b) << 16;  // bf16 is the top half of a float32
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline float fp16_to_float(uint16_t h) {  // IEEE half: 1 sign, 5 exponent, 10 mantissa bits
    const int exponent = (h >> 10) & 31, mantissa = h & 1023;
    float v;
    if (exponent == 0) v = std::ldexp(float(mantissa), -24);                    // zero, subnormal
    else if (exponent == 31) v = mantissa ? NAN : INFINITY;                       // inf, NaN
    else v = std::ldexp(float(mantissa | 1024), exponent - 25);                 // normal
    return (h & 0x8000) ? -v : v;
}

// The scale of block b of a Q8_0 row (little-endian float16 at the block's start).
inline float q8_scale(const uint8_t* row, int b) {
    const uint8_t* block = row + size_t(b) * kQ8BlockBytes;
    return fp16_to_float(uint16_t(block[0] | (block[1] << 8)));
}
inline int8_t q8_value(const uint8_t* row, int k) {
    return int8_t(row[size_t(k / kQ8Block) * kQ8BlockBytes + 2 + k % kQ8Block]);
}

// Row o of a stored matrix, decoded into in floats.
inline void decode_row(float* w, const StoredMatrix& s, int o) {
    if (s.format == WeightFormat::BF16) {
        const uint16_t* row = s.bf16() + size_t(o) * s.in;
        for (int k = 0; k < s.in; ++k) w[k] = bf16_to_float(row[k]);
    } else {
        const uint8_t* row = s.q8() + size_t(o) * stored_bytes(WeightFormat::Q8, 1, s.in);
        for (int k = 0; k < s.in; ++k) w[k] = float(q8_value(row, k)) * q8_scale(row, k / kQ8Block);
    }
}

// ---- what this CPU has: cpu_features() (cpu.hpp, read with cpuid at run time) ---------------------
// Which widening code runs: the AVX-512 intrinsics when this build has them and the CPU reports
// them, else the portable vector extensions (the width -march=native gives).
inline bool use_avx512_widen() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return cpu_features().avx512f && cpu_features().avx512bw;
#else
    return false;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define CI_REDUCED_VNNI 1
#endif

// How far ahead of its reads a reduced GEMV (q8 on VNNI, bf16) prefetches its weights, in bytes (0: not
// at all). On an Intel Xeon (2 threads, minimind2, weights from DRAM) 4 KB ahead took the q8 GEMV
// from 17-18 to 22-30 GB/s and the bench's q8 decode from 2.10x to 2.72x float32's, and bf16's from
// 1.25-1.29x to 1.76-1.78x (the hardware prefetcher alone fell behind the reduced GEMVs, not the
// float32 one; 2, 8 and 12 KB ahead were slower for bf16); on Zen 4, 4 to 16 blocks ahead made the q8
// GEMV slower (measured), so other CPUs keep the hardware's alone.
inline int gemv_prefetch_bytes() { return cpu_features().intel ? 4096 : 0; }

// The q8 VNNI GEMV (fast::vnni_gemv, below) runs when this build has the instructions and the CPU reports them.
inline bool use_vnni() {
#if defined(CI_REDUCED_VNNI)
    return use_avx512_widen() && cpu_features().avx512_vnni;
#else
    return false;
#endif
}

// Which q8 GEMV runs, for cpu_report().
inline std::string q8_gemv_path() {
#if defined(CI_REDUCED_VNNI)
    if (use_vnni()) return "vpdpbusd (VNNI) on int8 digits of the activations";
    return "widening (the CPU reports no avx512_vnni)";
#else
    return "widening (this build has no __AVX512VNNI__)";
#endif
}

inline std::string cpu_report() {
    const CpuFeatures& c = cpu_features();
    std::string s = std::string("avx2=") + (c.avx2 ? "yes" : "no") + " avx512f=" + (c.avx512f ? "yes" : "no") +
                    " avx512bw=" + (c.avx512bw ? "yes" : "no") + " avx512_bf16=" + (c.avx512_bf16 ? "yes" : "no") +
                    " (not used: it rounds activations)" + " avx512_vnni=" + (c.avx512_vnni ? "yes" : "no");
    return s + "; widening: " + (use_avx512_widen() ? "avx512 intrinsics" : "portable vector extensions") +
           "; q8 decode GEMV: " + q8_gemv_path() + "; decode GEMV weights prefetched " +
           (gemv_prefetch_bytes() ? std::to_string(gemv_prefetch_bytes() / 1024) + " KB ahead (bf16, q8 on VNNI)" : "by the hardware alone");
}

// ---- the readable reduced sets --------------------------------------------------------------------
// Per output row: decode the weights into floats, then ops.hpp's dot (the float32 set's sum order).
struct ReadableReducedKernels : ReadableKernels {
    std::unordered_map<const float*, StoredMatrix> stored;  // by the float32 decoding's address
    mutable std::vector<float> row;                           // one decoded row

    void prepare_linear(const float* W, int out, int in) { ReadableKernels::prepare_linear(W, out, in); }
    void prepare_stored(const float* W, int out, int in, const StoredMatrix* s, WeightFormat format) {
        if (!s) return;  // float32 in every model (the router): ReadableKernels::linear
        CI_CHECK(s->format == format && s->out == out && s->in == in, "kernel set for ", weight_format_name(format),
                 " weights was handed a ", weight_format_name(s->format), " [", s->out, ", ", s->in, "] matrix for [",
                 out, ", ", in, "]");
        stored[W] = *s;
        if (int(row.size()) < in) row.resize(in);
    }
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        const auto it = stored.find(W);
        if (it == stored.end()) return ReadableKernels::linear(y, x, W, rows, in, out);
        for (int o = 0; o < out; ++o) {
            decode_row(row.data(), it->second, o);
            for (int r = 0; r < rows; ++r) y[size_t(r) * out + o] = dot(x + size_t(r) * in, row.data(), in);
        }
    }
};

struct ReadableBf16Kernels : ReadableReducedKernels {
    using ReadableReducedKernels::prepare_linear;
    static constexpr WeightFormat weight_format = WeightFormat::BF16;
    void prepare_linear(const float* W, int out, int in, const StoredMatrix* s) { prepare_stored(W, out, in, s, weight_format); }
};

struct ReadableQ8Kernels : ReadableReducedKernels {
    using ReadableReducedKernels::prepare_linear;
    static constexpr WeightFormat weight_format = WeightFormat::Q8;
    void prepare_linear(const float* W, int out, int in, const StoredMatrix* s) { prepare_stored(W, out, in, s, weight_format); }
};

// ---- the fast reduced sets ----------------------------------------------------------------------
namespace fast {

// A stored matrix repacked in panels of 16 outputs, outputs past `out` zero.
// bf16: k pairs interleaved, [panel][k/2][16 outputs][2 k] (in padded to even, kpad): the 32-bit word
// of an output holds w[k] in its low half and w[k+1] in its high half, so one 64-byte load widens
// to both k's floats with a shift (w[k]: word << 16) and a mask (w[k+1]: word & 0xFFFF0000), no
// shuffle. (The [panel][k][16] layout took a 32-byte load, a zero-extension and a shift per 16 weights:
// the GEMV was instruction-bound.)
// q8: packing.hpp's PackedMatrix layout [panel][k][16], k over whole blocks (in padded to a multiple
// of 32: kpad), scales [panel][block][16]; when the VNNI GEMV runs (use_vnni()), also its own layout
// (see pack_vnni).
struct PackedReduced {
    WeightFormat format = WeightFormat::F32;
    int out = 0, in = 0, panels = 0, blocks = 0, kpad = 0;
    WeightBuffer<uint16_t> bf16;  // [panel][kpad/2][16][2]
    WeightBuffer<int8_t> q8;      // [panel][kpad][16]
    std::vector<float> scales;    // [panel][blocks][16]
    // The VNNI GEMV's q8 layout, from a 64-byte aligned start: [panel][block] of kVnniBlockBytes:
    // the block's 16 float16 scales (32 bytes, then 32 of padding), then [8 groups of 4 k][16 outputs]
    // [4 k] uint8 (the int8 + 128: vpdpbusd's unsigned operand). One stride from the first block to
    // the last, across panels: with the scales in a run per panel the stream broke at every panel and
    // the GEMV ran 1.5x slower on 27 MB of weights (measured). Empty when the GEMV does not run.
    WeightBuffer<uint8_t> vnni_bytes;
    size_t vnni_offset = 0, vnni_stride = 0;
    const uint8_t* vnni() const { return vnni_bytes.data() + vnni_offset; }
};

// One matrix of a GEMV job: y = x . W^T. A job holds the matrices that read one x (q, k, v; gate,
// up: forward.hpp's linears), their panels in one parallel_for.
struct GemvPart {
    float* y;
    const PackedReduced* W;
};

// Task t of a job over parts' panels: the part it falls in and the panel within (part and first
// carry the previous answer: tasks come in increasing order).
inline int part_panel(const GemvPart* parts, int t, int& part, int& first) {
    return task_in_part(t, part, first, [parts](int i) { return parts[i].W->panels; });
}
inline int total_panels(const GemvPart* parts, int n) {
    int panels = 0;
    for (int i = 0; i < n; ++i) panels += parts[i].W->panels;
    return panels;
}

// ---- q8 decode on VNNI (vpdpbusd), still the float32 product of the decoded weights --------------
// vpdpbusd multiplies unsigned bytes by signed bytes, four per int32 lane, exactly. The weights are
// the unsigned side (q + 128); the activations become exact integers split into signed bytes:
// per row and block of 32 k, with 2^e > max|x| of the block (a power of two, e >= -119),
//   X_k = round(x_k * 2^(30-e)),  |X_k| < 2^30,  X_k = 2^24 l3 + 2^16 l2 + 2^8 l1 + l0  (l: int8 digits)
// and per output, exactly in int32: D_i = sum_k (q_k + 128) l_i(k) = sum_k q_k l_i(k) + 128 C_i, with
// C_i = sum_k l_i(k) known from the activations alone, so
//   sum_k q_k X_k = 2^16 hi + lo,  hi = 2^8 D3 + D2 - 128 (2^8 C3 + C2),  lo = 2^8 D1 + D0 - 128 (2^8 C1 + C0)
// (every term below 2^29), and the block adds d * 2^(e-30) * (2^16 float(hi) + float(lo)) to the
// output (d: the block's float16 scale). The errors, against the exact sum_k d q_k x_k:
// * X_k is exact when x_k's ulp >= 2^(e-30) (within 2^7 of the block's largest); otherwise its
//   rounding is <= 2^(e-31) <= 2^-30 max|x|: per weight, 2^-6 of float32's rounding of that
//   largest activation — 1/64 of one float32 ulp of max|x|, where a float32 dot rounds every partial sum;
// * hi, lo and 2^16 hi + lo each round once to float32 (<= 2^-24 relative, of the block's sum or of
//   lo < 2^28 units: 2^(e-26) d, ~2^-9 of one int8 weight times max|x| rounded in float32),
// * the product by d rounds once and the power of two is exact (unless it lands in subnormals,
//   where float32's own product rounds too).
// So a block's sum is within about two float32 ulps of exact, where the float32 GEMV rounds after
// each of its 32 fused multiply-adds: the precision-matched oracle judges it within the same floors
// (tests/test_reduced_kernels.py: random, outlier, zero, subnormal and huge activations). Three
// digits (24-bit activations) would round the small activations of a block with a 1000x outlier
// at 2^-14 of their size, above float32's rounding of a 512-term dot: not done. A non-finite
// activation (inf, NaN) takes the widening GEMV instead, which propagates it as float32 does.
// Working memory of a FastReducedKernels set: the GEMV's activation digits, the GEMM's decoded panels
// (one buffer per pool thread).
struct ReducedScratch {
    std::vector<int32_t> digits;  // [row][block][4 digits][8 groups]: 4 int8 digits of 4 k in one int32
    std::vector<float> unit;      // [row][block]: 2^(e-30)
    std::vector<int32_t> hi_fix, lo_fix;  // [row][block]: 128 (2^8 C3 + C2), 128 (2^8 C1 + C0)
    // Per thread: up to three decoded panels [3][in][16], 64-byte aligned (the arena's): from a plain
    // vector (16-byte aligned) every 64-byte load of the micro-kernel split two cache lines, and on an
    // Intel Xeon the q8/bf16 prefill ran 7-17% slower than float32, depending on where malloc put the
    // buffers (measured; on Zen 4 it did not show).
    std::vector<WeightBuffer<float>> panels;
};

// 2^n as a float, n in [-149, 127] (subnormal below -126), from its bits: no libm call per block.
inline float pow2f(int n) {
    const uint32_t bits = n >= -126 ? uint32_t(n + 127) << 23 : 1u << (n + 149);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(CI_REDUCED_VNNI)
constexpr size_t kVnniBlockBytes = 64 + 512;  // a block's scales (padded to a cache line), its weights

inline void pack_vnni(PackedReduced& P) {
    P.vnni_stride = size_t(P.blocks) * kVnniBlockBytes;
    P.vnni_bytes.assign(size_t(P.panels) * P.vnni_stride + 64, 0);
    P.vnni_offset = (64 - reinterpret_cast<uintptr_t>(P.vnni_bytes.data()) % 64) % 64;
    uint8_t* base = P.vnni_bytes.data() + P.vnni_offset;
    for (int p = 0; p < P.panels; ++p) {
        uint8_t* panel = base + size_t(p) * P.vnni_stride;
        for (int k = 0; k < P.kpad; ++k)
            for (int lane = 0; lane < 16; ++lane)
                panel[size_t(k / 32) * kVnniBlockBytes + 64 + size_t(k % 32 / 4) * 64 + lane * 4 + k % 4] =
                    uint8_t(int(P.q8[(size_t(p) * P.kpad + k) * 16 + lane]) + 128);
        for (int b = 0; b < P.blocks; ++b) {  // the scales came from float16: converting back is exact
            const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(P.scales.data() + (size_t(p) * P.blocks + b) * 16),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + size_t(b) * kVnniBlockBytes), h);
        }
    }
}

#endif

inline PackedReduced pack_reduced(const StoredMatrix& s) {
    PackedReduced P;
    P.format = s.format;
    P.out = s.out;
    P.in = s.in;
    P.panels = (s.out + 15) / 16;
    if (s.format == WeightFormat::BF16) {
        P.kpad = (s.in + 1) / 2 * 2;
        P.bf16.assign(size_t(P.panels) * P.kpad * 16, 0);
        for (int o = 0; o < s.out; ++o)
            for (int k = 0; k < s.in; ++k)
                P.bf16[(size_t(o / 16) * P.kpad + k / 2 * 2) * 16 + o % 16 * 2 + k % 2] = s.bf16()[size_t(o) * s.in + k];
        return P;
    }
    P.blocks = (s.in + kQ8Block - 1) / kQ8Block;
    P.kpad = P.blocks * kQ8Block;
    P.q8.assign(size_t(P.panels) * P.kpad * 16, 0);
    P.scales.assign(size_t(P.panels) * P.blocks * 16, 0.0f);
    const size_t row_bytes = stored_bytes(WeightFormat::Q8, 1, s.in);
    for (int o = 0; o < s.out; ++o) {
        const uint8_t* row = s.q8() + size_t(o) * row_bytes;
        const size_t p = o / 16, lane = o % 16;
        for (int b = 0; b < P.blocks; ++b) P.scales[(p * P.blocks + b) * 16 + lane] = q8_scale(row, b);
        for (int k = 0; k < s.in; ++k) P.q8[(p * P.kpad + k) * 16 + lane] = q8_value(row, k);
    }
#if defined(CI_REDUCED_VNNI)
    if (use_vnni()) pack_vnni(P);
#endif
    return P;
}

typedef int8_t vi8x16 __attribute__((vector_size(16)));

// 16 packed int8 weights -> 16 floats (before the block's scale), two ways: Widen::q8(p). (bf16 needs
// no widening code of its own: see bf16_pair.)
struct WidenPortable {
    static CI_VINLINE vf16 q8(const int8_t* p) {
        vi8x16 q;
        std::memcpy(&q, p, sizeof q);
        return __builtin_convertvector(q, vf16);  // sign-extend, then convert
    }
};
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct WidenAvx512 {
    static CI_VINLINE vf16 q8(const int8_t* p) {
        return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
};
#endif

// The bf16 weights of panel p at k and k + 1 (k even) as float32: one load, a shift, a mask.
CI_VINLINE void bf16_pair(const PackedReduced& W, int p, int k, vf16& even, vf16& odd) {
    vi16 words;
    std::memcpy(&words, W.bf16.data() + (size_t(p) * W.kpad + k) * 16, sizeof words);
    // One load into a register: g++ folded it into both the shift and the mask, two 64-byte loads
    // where one will do (measured 1.3x slower than the [k][16] layout in L2 on Zen 4).
    __asm__("" : "+v"(words));
    even = (vf16)(words << 16);
    odd = (vf16)(words & int32_t(0xFFFF0000u));
}

// The 16 weights of panel p at k, widened to float32 (q8: the int8 values, before the scale).
template <class Widen, WeightFormat F>
CI_VINLINE vf16 widened(const PackedReduced& W, int p, int k) {
    if constexpr (F == WeightFormat::BF16) {
        vf16 even, odd;
        bf16_pair(W, p, k & ~1, even, odd);
        return k % 2 ? odd : even;
    } else {
        return Widen::q8(W.q8.data() + (size_t(p) * W.kpad + k) * 16);
    }
}

// The 16 weights of panel p at k and k + 1 (k even), widened as widened() does.
template <class Widen, WeightFormat F>
CI_VINLINE void widened_pair(const PackedReduced& W, int p, int k, vf16& w0, vf16& w1) {
    if constexpr (F == WeightFormat::BF16) {
        bf16_pair(W, p, k, w0, w1);
    } else {
        w0 = widened<Widen, F>(W, p, k);
        w1 = widened<Widen, F>(W, p, k + 1);
    }
}
// The scales of panel p's block b (q8; bf16 has none).
CI_VINLINE vf16 scale_at(const PackedReduced& W, int p, int b) {
    return vload(W.scales.data() + (size_t(p) * W.blocks + b) * 16);
}

template <int R, int NP>
CI_VINLINE void store_tile(float* y, const vf16 (&acc)[R][NP], int out, int panel, int ldy) {
    for (int p = 0; p < NP; ++p) {
        const int o = (panel + p) * 16, valid = std::min(16, out - o);
        for (int r = 0; r < R; ++r) {
            if (valid == 16) {
                vstore(y + size_t(r) * ldy + o, acc[r][p]);
            } else {
                float tmp[16];
                vstore(tmp, acc[r][p]);
                std::memcpy(y + size_t(r) * ldy + o, tmp, sizeof(float) * valid);
            }
        }
    }
}

#if defined(CI_REDUCED_VNNI)
// The activation digits of `rows` rows (see above); false when a value is not finite.
inline bool vnni_digits(ReducedScratch& s, const float* x, int rows, int in, int blocks) {
    const size_t n = size_t(rows) * blocks;
    if (s.unit.size() < n) {
        s.digits.resize(n * 32);
        s.unit.resize(n);
        s.hi_fix.resize(n);
        s.lo_fix.resize(n);
    }
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < blocks; ++b) {
            const float* xb = x + size_t(r) * in + size_t(b) * 32;
            const int left = in - b * 32;
            const __mmask16 m0 = left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1);
            const __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : __mmask16((1u << (left - 16)) - 1);
            __m512 v[2] = {_mm512_maskz_loadu_ps(m0, xb), _mm512_maskz_loadu_ps(m1, xb + 16)};
            const int max_bits = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_and_si512(_mm512_castps_si512(v[0]), abs_bits),
                                                                          _mm512_and_si512(_mm512_castps_si512(v[1]), abs_bits)));
            const int E = max_bits >> 23;  // max|x| < 2^(E-126) (normal), < 2^-126 (E = 0)
            if (E == 255) return false;
            const int e = std::max(E - 126, -119), shift = 30 - e;  // shift <= 149: two exact steps
            const __m512 s1 = _mm512_set1_ps(pow2f(shift / 2)), s2 = _mm512_set1_ps(pow2f(shift - shift / 2));
            __m512i hi_sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
            int32_t* digits = s.digits.data() + (size_t(r) * blocks + b) * 32;
            for (int h = 0; h < 2; ++h) {
                const __m512i X = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_mul_ps(v[h], s1), s2),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512i l[4], rest = X;
                for (int i = 0; i < 3; ++i) {  // digits in [-128, 127]; the last one |l3| <= 65
                    l[i] = _mm512_srai_epi32(_mm512_slli_epi32(rest, 24), 24);
                    rest = _mm512_srai_epi32(_mm512_sub_epi32(rest, l[i]), 8);
                }
                l[3] = rest;
                hi_sum = _mm512_add_epi32(hi_sum, _mm512_add_epi32(_mm512_slli_epi32(l[3], 8), l[2]));
                lo_sum = _mm512_add_epi32(lo_sum, _mm512_add_epi32(_mm512_slli_epi32(l[1], 8), l[0]));
                for (int i = 0; i < 4; ++i)  // 16 k -> 16 bytes: the dwords of groups 4h ... 4h+3
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(digits + i * 8 + h * 4), _mm512_cvtepi32_epi8(l[i]));
            }
            s.unit[size_t(r) * blocks + b] = pow2f(e - 30);
            s.hi_fix[size_t(r) * blocks + b] = 128 * _mm512_reduce_add_epi32(hi_sum);
            s.lo_fix[size_t(r) * blocks + b] = 128 * _mm512_reduce_add_epi32(lo_sum);
        }
    return true;
}

// R rows x the 16 outputs of panel p. The loops are unrolled by pragma: at -O2 (cling's level) g++
// kept D and E on the stack, a store and a reload around every vpdpbusd (measured 1.5x slower).
template <int R>
inline void vnni_gemv_panel(float* y, const PackedReduced& W, const ReducedScratch& s, int p, int prefetch) {
    const int blocks = W.blocks;
    const uint8_t* panel = W.vnni() + size_t(p) * W.vnni_stride;
    __m512 acc[R];
    CI_UNROLL
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512 two16 = _mm512_set1_ps(65536.0f);
    for (int b = 0; b < blocks; ++b) {
        __m512i D[R][4], E[R][4];  // even and odd groups: chains half as long
        CI_UNROLL
        for (int r = 0; r < R; ++r) {
            CI_UNROLL
            for (int i = 0; i < 4; ++i) D[r][i] = E[r][i] = _mm512_setzero_si512();
        }
        const uint8_t* wb = panel + size_t(b) * kVnniBlockBytes + 64;
        if (prefetch)  // the block's 9 lines, `prefetch` bytes on (past a panel: the next one's)
            for (int line = 0; line < int(kVnniBlockBytes / 64); ++line)
                _mm_prefetch(reinterpret_cast<const char*>(wb - 64) + prefetch + line * 64, _MM_HINT_T0);
        CI_UNROLL
        for (int g = 0; g < 8; g += 2) {
            const __m512i w0 = _mm512_load_si512(wb + g * 64), w1 = _mm512_load_si512(wb + g * 64 + 64);
            CI_UNROLL
            for (int r = 0; r < R; ++r) {
                const int32_t* digits = s.digits.data() + (size_t(r) * blocks + b) * 32 + g;
                CI_UNROLL
                for (int i = 0; i < 4; ++i) D[r][i] = _mm512_dpbusd_epi32(D[r][i], w0, _mm512_set1_epi32(digits[i * 8]));
                CI_UNROLL
                for (int i = 0; i < 4; ++i) E[r][i] = _mm512_dpbusd_epi32(E[r][i], w1, _mm512_set1_epi32(digits[i * 8 + 1]));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(wb - 64)));
        CI_UNROLL
        for (int r = 0; r < R; ++r) {
            CI_UNROLL
            for (int i = 0; i < 4; ++i) D[r][i] = _mm512_add_epi32(D[r][i], E[r][i]);  // exact: each below 2^21
            const size_t rb = size_t(r) * blocks + b;
            const __m512i hi = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(D[r][3], 8), D[r][2]), _mm512_set1_epi32(s.hi_fix[rb]));
            const __m512i lo = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(D[r][1], 8), D[r][0]), _mm512_set1_epi32(s.lo_fix[rb]));
            const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), two16, _mm512_cvtepi32_ps(lo));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(sum, d), _mm512_set1_ps(s.unit[rb]), acc[r]);
        }
    }
    vf16 out[R][1];
    for (int r = 0; r < R; ++r) out[r][0] = (vf16)acc[r];
    store_tile<R, 1>(y, out, W.out, p, W.out);
}

// Rows the VNNI GEMV takes: per row it runs four vpdpbusd where the widening GEMV runs four FMAs,
// so what it saves is the widening, shared by the rows (measured, one thread, CPU time: 1.35-1.6x
// faster at 1 row, 1.0-1.15x at 2, 0.8-0.95x at 3 and 4).
constexpr int kVnniRows = 2;

// The GEMV on VNNI: the digits once (on the caller; the parts share x, so once for all), then the
// parts' panels streamed by both threads as reduced_gemv does. false (nothing written) when an
// activation is not finite.
inline bool vnni_gemv(const GemvPart* parts, int n, const float* x, int rows, ReducedScratch& s) {  // rows 1, 2
    const PackedReduced& W0 = *parts[0].W;
    if (!vnni_digits(s, x, rows, W0.in, W0.blocks)) return false;
    const int panels = total_panels(parts, n);
    const bool parallel = double(panels) * W0.kpad * 16 > 65536;
    const int prefetch = gemv_prefetch_bytes();
    ThreadPool::instance().parallel_for(panels, [&](int begin, int end, int) {
        int part = 0, first = 0;
        for (int t = begin; t < end; ++t) {
            const int p = part_panel(parts, t, part, first);
            if (rows == 1) vnni_gemv_panel<1>(parts[part].y, *parts[part].W, s, p, prefetch);
            else vnni_gemv_panel<2>(parts[part].y, *parts[part].W, s, p, prefetch);
        }
    }, parallel);
    return true;
}
#endif

// ---- the GEMM (prefill): decoded panels, then fast.hpp's micro-kernel arithmetic -----------------
// Panel p's weights decoded to float32 [in][16] (q8: the int8 times its block's scale, exact).
template <class Widen, WeightFormat F>
inline void decode_panel(float* dst, const PackedReduced& W, int p) {
    if constexpr (F == WeightFormat::BF16) {
        int k = 0;
        for (; k + 2 <= W.in; k += 2) {
            vf16 w0, w1;
            bf16_pair(W, p, k, w0, w1);
            vstore(dst + size_t(k) * 16, w0);
            vstore(dst + size_t(k + 1) * 16, w1);
        }
        if (k < W.in) vstore(dst + size_t(k) * 16, widened<Widen, F>(W, p, k));
    } else {
        for (int k0 = 0; k0 < W.in; k0 += kQ8Block) {
            const vf16 s = scale_at(W, p, k0 / kQ8Block);
            for (int k = k0, k1 = std::min(W.in, k0 + kQ8Block); k < k1; ++k)
                vstore(dst + size_t(k) * 16, widened<Widen, F>(W, p, k) * s);
        }
    }
}

// fast::linear's split (panel triples, and row chunks when triples are few); each task decodes its
// triple once into its thread's buffer (48 x in floats: L2-sized) and runs every row of its chunk
// on it. (Widening 64-k chunks per 6-row tile, or widening inside the micro-kernel, was slower.)
template <class Widen, WeightFormat F>
inline void decoded_gemm(float* y, const float* x, const PackedReduced& W, int rows, ReducedScratch& s) {
    const int triples = (W.panels + 2) / 3;
    const int row_chunks = (triples < 16 && rows >= kRowChunkRows) ? 4 : 1;
    const bool parallel = linear_worth_parallel(rows, double(W.in) * W.out);
    if (int(s.panels.size()) < num_threads()) s.panels.resize(num_threads());
    for (auto& buffer : s.panels)
        if (buffer.size() < size_t(3) * W.in * 16) buffer.resize(size_t(3) * W.in * 16);
    ThreadPool::instance().parallel_for(triples * row_chunks, [&](int begin, int end, int thread) {
        float* w = s.panels[thread].data();
        for (int task = begin; task < end; ++task) {
            const int t = task / row_chunks, chunk = task % row_chunks;
            const int r0 = int(int64_t(rows) * chunk / row_chunks) / kGemmRows * kGemmRows;
            const int r1 =
                chunk + 1 == row_chunks ? rows : int(int64_t(rows) * (chunk + 1) / row_chunks) / kGemmRows * kGemmRows;
            if (r1 <= r0) continue;
            float* yc = y + size_t(r0) * W.out;
            const float* xc = x + size_t(r0) * W.in;
            const int panel = 3 * t, np = std::min(3, W.panels - panel);
            for (int p = 0; p < np; ++p) decode_panel<Widen, F>(w + size_t(p) * W.in * 16, W, panel + p);
            gemm_panels(yc, xc, w, W.in, W.out, np, r1 - r0, panel);
        }
    }, parallel);
}

// The GEMV (decode: R <= 4 rows), one panel at a time, so both threads get equal shares of even a
// k_proj's few panels. Four accumulator chains per row (k, k+1, k+2, k+3): with two, the FMAs'
// latency bound it (measured: 1.5x slower at 2 rows on cached weights). q8 sums each block's
// int8 products, then adds them times the block's scales (one multiply per block, not per weight).
template <class Widen, WeightFormat F, int R>
inline void reduced_gemv_panel(float* y, const float* x, const PackedReduced& W, int p, int prefetch) {
    const int in = W.in, step = F == WeightFormat::Q8 ? kQ8Block : in;
    vf16 acc[R][1];
    for (int r = 0; r < R; ++r) acc[r][0] = vf16{};
    for (int k0 = 0, b = 0; k0 < in; k0 += step, ++b) {
        vf16 a0[R], a1[R], a2[R], a3[R];
        for (int r = 0; r < R; ++r) a0[r] = a1[r] = a2[r] = a3[r] = vf16{};
        const int k1 = std::min(in, k0 + step);
        int k = k0;
        for (; k + 4 <= k1; k += 4) {
            if constexpr (F == WeightFormat::BF16)
                if (prefetch) {  // this step's two lines, `prefetch` bytes on
                    const char* line = reinterpret_cast<const char*>(W.bf16.data() + (size_t(p) * W.kpad + k) * 16) + prefetch;
                    __builtin_prefetch(line, 0, 3);
                    __builtin_prefetch(line + 64, 0, 3);
                }
            vf16 w0, w1, w2, w3;  // k0 and k are even (q8 blocks are 32 wide)
            widened_pair<Widen, F>(W, p, k, w0, w1);
            widened_pair<Widen, F>(W, p, k + 2, w2, w3);
            for (int r = 0; r < R; ++r) {
                const float* xr = x + size_t(r) * in + k;
                a0[r] += w0 * xr[0];
                a1[r] += w1 * xr[1];
                a2[r] += w2 * xr[2];
                a3[r] += w3 * xr[3];
            }
        }
        for (; k < k1; ++k) {
            const vf16 w0 = widened<Widen, F>(W, p, k);
            for (int r = 0; r < R; ++r) a0[r] += w0 * x[size_t(r) * in + k];
        }
        if constexpr (F == WeightFormat::Q8) {
            const vf16 s = scale_at(W, p, b);
            for (int r = 0; r < R; ++r) acc[r][0] += ((a0[r] + a1[r]) + (a2[r] + a3[r])) * s;
        } else {
            for (int r = 0; r < R; ++r) acc[r][0] += (a0[r] + a1[r]) + (a2[r] + a3[r]);
        }
    }
    store_tile<R, 1>(y, acc, W.out, p, W.out);
}

template <class Widen, WeightFormat F>
inline void reduced_gemv(const GemvPart* parts, int n, const float* x, int rows) {
    // Streaming the weights: two cores are faster than one from about 64 KB of them on.
    const int panels = total_panels(parts, n);
    const bool parallel = double(panels) * parts[0].W->in * 16 * (F == WeightFormat::Q8 ? 1 : 2) > 65536;
    const int prefetch = F == WeightFormat::BF16 ? gemv_prefetch_bytes() : 0;
    ThreadPool::instance().parallel_for(panels, [&](int begin, int end, int) {
        int part = 0, first = 0;
        for (int t = begin; t < end; ++t) {
            const int p = part_panel(parts, t, part, first);
            float* y = parts[part].y;
            const PackedReduced& W = *parts[part].W;
            switch (rows) {
                case 1: reduced_gemv_panel<Widen, F, 1>(y, x, W, p, prefetch); break;
                case 2: reduced_gemv_panel<Widen, F, 2>(y, x, W, p, prefetch); break;
                case 3: reduced_gemv_panel<Widen, F, 3>(y, x, W, p, prefetch); break;
                default: reduced_gemv_panel<Widen, F, 4>(y, x, W, p, prefetch); break;
            }
        }
    }, parallel);
}

// The parts (one input x; one format, one `in`): the GEMV job (rows <= 4), else each part's GEMM.
template <class Widen>
inline void reduced_linear_with(const GemvPart* parts, int n, const float* x, int rows, ReducedScratch& s) {
    if (parts[0].W->format == WeightFormat::BF16) {
        if (rows <= 4) reduced_gemv<Widen, WeightFormat::BF16>(parts, n, x, rows);
        else for (int i = 0; i < n; ++i) decoded_gemm<Widen, WeightFormat::BF16>(parts[i].y, x, *parts[i].W, rows, s);
    } else {
        if (rows <= 4) {
#if defined(CI_REDUCED_VNNI)
            bool vnni = rows <= kVnniRows;
            for (int i = 0; i < n; ++i) vnni = vnni && !parts[i].W->vnni_bytes.empty();
            if (vnni && vnni_gemv(parts, n, x, rows, s)) return;
#endif
            reduced_gemv<Widen, WeightFormat::Q8>(parts, n, x, rows);
        }
        else for (int i = 0; i < n; ++i) decoded_gemm<Widen, WeightFormat::Q8>(parts[i].y, x, *parts[i].W, rows, s);
    }
}

// y = x[rows, in] . W^T for each part (packed bf16 / q8 matrices of one format and one in), on the
// CPU's best widening.
inline void reduced_linears(const GemvPart* parts, int n, const float* x, int rows, ReducedScratch& s) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (use_avx512_widen()) return reduced_linear_with<WidenAvx512>(parts, n, x, rows, s);
#endif
    reduced_linear_with<WidenPortable>(parts, n, x, rows, s);
}

inline void reduced_linear(float* y, const float* x, const PackedReduced& W, int rows, ReducedScratch& s) {
    const GemvPart part{y, &W};
    reduced_linears(&part, 1, x, rows, s);
}

}  // namespace fast

// FastKernels with the linears of stored weights on packed bf16 / q8 panels.
struct FastReducedKernels : FastKernels {
    std::unordered_map<const float*, fast::PackedReduced> reduced;  // by the float32 decoding's address
    mutable fast::ReducedScratch scratch;

    void prepare_linear(const float* W, int out, int in) { FastKernels::prepare_linear(W, out, in); }
    void prepare_stored(const float* W, int out, int in, const StoredMatrix* s, WeightFormat format) {
        if (!s) return FastKernels::prepare_linear(W, out, in);  // float32 in every model (the router)
        CI_CHECK(s->format == format && s->out == out && s->in == in, "kernel set for ", weight_format_name(format),
                 " weights was handed a ", weight_format_name(s->format), " [", s->out, ", ", s->in, "] matrix for [",
                 out, ", ", in, "]");
        if (!reduced.count(W)) reduced[W] = fast::pack_reduced(*s);
    }
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        const auto it = reduced.find(W);
        if (it == reduced.end()) return FastKernels::linear(y, x, W, rows, in, out);
        CI_CHECK(it->second.in == in && it->second.out == out, "reduced kernels: packed shape mismatch");
        fast::reduced_linear(y, x, it->second, rows, scratch);
    }
    // Several linears of x (forward.hpp's linears): at decode one job (the GEMV over every part's
    // panels; q8 on VNNI: x's digits once), else one call each.
    void linears(const float* x, int rows, int in, const LinearOut* outs, int n) const {
        fast::GemvPart parts[4];
        bool fused = rows <= fast::kFusedRows && n <= 4;
        for (int i = 0; i < n && fused; ++i) {
            const auto it = reduced.find(outs[i].W);
            fused = it != reduced.end() && it->second.in == in && it->second.out == outs[i].out &&
                    it->second.format == reduced.find(outs[0].W)->second.format;
            if (fused) parts[i] = {outs[i].y, &it->second};
        }
        if (!fused) {
            for (int i = 0; i < n; ++i) linear(outs[i].y, x, outs[i].W, rows, in, outs[i].out);
            return;
        }
        fast::reduced_linears(parts, n, x, rows, scratch);
    }
};

struct Bf16Kernels : FastReducedKernels {
    using FastReducedKernels::prepare_linear;
    static constexpr WeightFormat weight_format = WeightFormat::BF16;
    void prepare_linear(const float* W, int out, int in, const StoredMatrix* s) { prepare_stored(W, out, in, s, weight_format); }
};

struct Q8Kernels : FastReducedKernels {
    using FastReducedKernels::prepare_linear;
    static constexpr WeightFormat weight_format = WeightFormat::Q8;
    void prepare_linear(const float* W, int out, int in, const StoredMatrix* s) { prepare_stored(W, out, in, s, weight_format); }
};

}  // namespace CELERINFER_NS
