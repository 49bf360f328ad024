// The trace hook: the forward reports each op's output as a Point of trace_points.hpp (generated
// from celerinfer_lab/trace.py), named and shaped by that table. With no sink (nullptr) nothing is
// built, copied or kept: names and shapes are built only for a sink, so an untraced forward
// allocates nothing.
// A sink may also hold teacher values: after an op's output is recorded it is overwritten by the
// teacher's, so the next op runs on exact inputs (teacher forcing, to isolate each op's own error).
// Tracing observes the kernels that run; it never swaps in another implementation.
// A timing sink (OpTimer) takes no values: at each point the hook only reads the clock, so each op's
// time is the time since the previous point (the profile; README "Profile and machine limits").
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"
#include "trace_points.hpp"

namespace CELERINFER_NS {

struct TraceSink {
    virtual ~TraceSink() = default;
    // A timing sink: trace_point calls stamp() instead of building names, shapes and copies, and the
    // kernels run as untraced (the attention taps stay off).
    bool timing = false;
    virtual void begin() {}  // run_forward calls it just before the forward
    virtual void stamp(int /*point*/, int /*layer*/, int /*index*/) {}
    virtual void record(const std::string& name, const float* data, const std::vector<int64_t>& shape) = 0;
    // The value to continue with instead of the op's output, or nullptr.
    virtual const float* teacher(const std::string& /*name*/, size_t /*numel*/) { return nullptr; }
};

// Keeps a copy of every point, in order; Python reads them back after the forward.
struct TraceRecorder : TraceSink {
    std::vector<std::string> names;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<std::vector<float>> values;
    std::map<std::string, std::pair<const float*, size_t>> teachers;  // not owned

    void record(const std::string& name, const float* data, const std::vector<int64_t>& shape) override {
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        names.push_back(name);
        shapes.push_back(shape);
        values.emplace_back(data, data + n);
    }
    const float* teacher(const std::string& name, size_t numel) override {
        auto it = teachers.find(name);
        if (it == teachers.end()) return nullptr;
        CI_CHECK(it->second.second == numel, "teacher value for '", name, "' has ", it->second.second,
                 " elements, the op produced ", numel);
        return it->second.first;
    }
    void set_teacher(const std::string& name, const float* data, size_t numel) { teachers[name] = {data, numel}; }
    void clear() { names.clear(); shapes.clear(); values.clear(); }
    size_t size() const { return names.size(); }
    const float* data(size_t i) const { return values.at(i).data(); }
    size_t numel(size_t i) const { return values.at(i).size(); }
    const std::vector<int64_t>& shape(size_t i) const { return shapes.at(i); }
    const std::string& name(size_t i) const { return names.at(i); }
};

// The profile's sink: per trace point reached, its (point, layer, index) and the nanoseconds since
// the previous point (the first: since begin()). Nothing is allocated while timing once reserve()d.
struct OpTimer : TraceSink {
    using Clock = std::chrono::steady_clock;
    std::vector<int> points, layers, indices;
    std::vector<double> ns;
    Clock::time_point last;
    bool accumulate = false;  // keep the stamps of every forward (decode steps) until clear()

    OpTimer() { timing = true; }
    void reserve(size_t n) { points.reserve(n); layers.reserve(n); indices.reserve(n); ns.reserve(n); }
    void clear() { points.clear(); layers.clear(); indices.clear(); ns.clear(); }
    void record(const std::string&, const float*, const std::vector<int64_t>&) override {}
    void begin() override {
        if (!accumulate) clear();
        last = Clock::now();
    }
    void stamp(int point, int layer, int index) override {
        const Clock::time_point now = Clock::now();
        points.push_back(point);
        layers.push_back(layer);
        indices.push_back(index);
        ns.push_back(std::chrono::duration<double, std::nano>(now - last).count());
        last = now;
    }
    size_t size() const { return ns.size(); }
};

// The name of point p (trace_points.hpp): "model.layers.{layer}.{suffix}" for a layer's point
// ("model.layers.{layer}" for the block output), with ".{index}" for a shared expert; the suffix
// alone for a model-level point. Built only when tracing.
inline std::string point_name(Point p, int layer, int index = -1) {
    const PointInfo& info = point_info(p);
    CI_CHECK(info.in_layer == (layer >= 0), "trace point '", info.suffix, "' ", info.in_layer ? "needs" : "takes no",
             " layer index");
    CI_CHECK(info.indexed == (index >= 0), "trace point '", info.suffix, "' ", info.indexed ? "needs" : "takes no",
             " shared-expert index");
    if (!info.in_layer) return info.suffix;
    std::string name = "model.layers." + std::to_string(layer) + (*info.suffix ? "." : "") + info.suffix;
    return info.indexed ? name + "." + std::to_string(index) : name;
}

inline size_t numel_of(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    return n;
}

// Record `data` as point p of `layer` (-1 for a model-level point), its shape from the table, then
// replace it by the sink's teacher value if it has one.
inline void trace_point(TraceSink* sink, int layer, Point p, float* data, const TraceDims& dims, int index = -1) {
    if (!sink) return;
    if (sink->timing) return sink->stamp(int(p), layer, index);
    const std::string name = point_name(p, layer, index);
    const std::vector<int64_t> shape = point_shape(p, dims);
    sink->record(name, data, shape);
    if (const float* forced = sink->teacher(name, numel_of(shape))) std::memcpy(data, forced, numel_of(shape) * sizeof(float));
}

// What a traced run observes inside an attention kernel, which may fuse scores, softmax and
// context: each kernel calls scores_row / probs_row on every row it computes. A row is recorded
// (keys the kernel skipped as causally masked are written as -inf / 0: they take no part), then
// replaced by the teacher's row. All pointers null when not tracing: the calls do nothing.
struct AttentionTaps {
    float* scores = nullptr;  // record, [B, heads, S, P]
    float* probs = nullptr;   // record, [B, heads, S, P]
    const float* scores_teacher = nullptr;
    const float* probs_teacher = nullptr;
    // Set by the kernel when it wrote a record: a kernel set that does not call the taps leaves
    // the points unobserved, and the trace says so instead of filling them from elsewhere.
    mutable std::atomic<bool> wrote_scores{false}, wrote_probs{false};

    // row: the P scores of row `row_index` (b, h, i flattened); only row[0, n_keys) were computed.
    void scores_row(size_t row_index, float* row, int n_keys, int P) const {
        tap(scores, scores_teacher, wrote_scores, row_index, row, n_keys, P, -std::numeric_limits<float>::infinity());
    }
    void probs_row(size_t row_index, float* row, int n_keys, int P) const {
        tap(probs, probs_teacher, wrote_probs, row_index, row, n_keys, P, 0.0f);
    }

private:
    static void tap(float* record, const float* teacher, std::atomic<bool>& wrote, size_t row_index, float* row,
                    int n_keys, int P, float skipped) {
        const size_t at = row_index * size_t(P);
        if (record) {
            std::memcpy(record + at, row, sizeof(float) * size_t(n_keys));
            for (int j = n_keys; j < P; ++j) record[at + j] = skipped;
            wrote.store(true, std::memory_order_relaxed);
        }
        if (teacher) std::memcpy(row, teacher + at, sizeof(float) * size_t(n_keys));
    }
};

}  // namespace CELERINFER_NS
