// The trace hook: the forward reports each op's output under the names of
// celerinfer_lab/trace.py. With no sink (nullptr) nothing is built, copied or kept.
// A sink may also hold teacher values: after an op's output is recorded it is overwritten by the
// teacher's, so the next op runs on exact inputs (teacher forcing, to isolate each op's own error).
#pragma once
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"

namespace CELERINFER_NS {

struct TraceSink {
    virtual ~TraceSink() = default;
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

// Record `data` as "model.layers.{layer}.{suffix}" (or `suffix` alone when layer < 0), then
// replace it by the sink's teacher value if it has one.
inline void trace_point(TraceSink* sink, int layer, const std::string& suffix, float* data,
                        std::initializer_list<int64_t> shape) {
    if (!sink) return;
    std::string name = layer < 0 ? suffix
                                 : "model.layers." + std::to_string(layer) + (suffix.empty() ? "" : ".") + suffix;
    size_t numel = 1;
    for (int64_t d : shape) numel *= size_t(d);
    sink->record(name, data, std::vector<int64_t>(shape));
    if (const float* forced = sink->teacher(name, numel)) std::memcpy(data, forced, numel * sizeof(float));
}

}  // namespace CELERINFER_NS
