// The trace hook: the forward reports each op's output under the names of
// celerinfer_lab/trace.py. With no sink (nullptr) nothing is built, copied or kept.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "check.hpp"

namespace CELERINFER_NS {

struct TraceSink {
    virtual ~TraceSink() = default;
    virtual void record(const std::string& name, const float* data, const std::vector<int64_t>& shape) = 0;
};

// Keeps a copy of every point, in order; Python reads them back after the forward.
struct TraceRecorder : TraceSink {
    std::vector<std::string> names;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<std::vector<float>> values;

    void record(const std::string& name, const float* data, const std::vector<int64_t>& shape) override {
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        names.push_back(name);
        shapes.push_back(shape);
        values.emplace_back(data, data + n);
    }
    void clear() { names.clear(); shapes.clear(); values.clear(); }
    size_t size() const { return names.size(); }
    const float* data(size_t i) const { return values.at(i).data(); }
    size_t numel(size_t i) const { return values.at(i).size(); }
    const std::vector<int64_t>& shape(size_t i) const { return shapes.at(i); }
    const std::string& name(size_t i) const { return names.at(i); }
};

// Record `data` as "model.layers.{layer}.{suffix}" (or `suffix` alone when layer < 0).
inline void trace_point(TraceSink* sink, int layer, const char* suffix, const float* data,
                        std::initializer_list<int64_t> shape) {
    if (!sink) return;
    std::string name = layer < 0 ? std::string(suffix)
                                 : "model.layers." + std::to_string(layer) + (*suffix ? "." : "") + suffix;
    sink->record(name, data, std::vector<int64_t>(shape));
}

}  // namespace CELERINFER_NS
