// libFuzzer target for the model-file reader (cpp/tools/model_file.hpp), under ASan + UBSan.
//
// Input encoding: the model file's JSON text, then optionally the separator "\n#SIDECAR#\n"
// followed by the bytes of the safetensors sidecar (any sidecar name the JSON gives maps to
// them; without the separator every sidecar is "missing"). The separator cannot occur in valid
// JSON ('#' is not JSON outside strings and a raw newline is not allowed inside one), so a
// real model file + separator + its real sidecar is a seed that loads.
//
// The last input byte decides allow_nonfinite (odd: allowed), so both paths are fuzzed.
// A celerinfer::ModelFileError is a refusal (fine); any other exception escaping, a crash, a
// sanitizer report, a leak or an allocation past -malloc_limit_mb is a bug.
//
//   cmake -S cpp -B build-fuzz -DCELERINFER_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++
//   cmake --build build-fuzz --target fuzz_model_file
//   build-fuzz/fuzz_model_file -dict=cpp/tests/fuzz_model_file.dict corpus/
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const std::string_view sep = "\n#SIDECAR#\n";
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    const size_t at = input.find(sep);
    const std::string_view json_text = input.substr(0, at);
    const bool has_sidecar = at != std::string_view::npos;
    // The sidecar in 8-byte aligned memory, as a page-aligned mapping would be.
    std::vector<uint64_t> side;
    size_t side_size = 0;
    if (has_sidecar) {
        const std::string_view rest = input.substr(at + sep.size());
        side_size = rest.size();
        side.assign((side_size + 7) / 8 + 1, 0);
        if (side_size) std::memcpy(side.data(), rest.data(), side_size);
    }
    celerinfer::SidecarProvider provider = [&](const std::string& name) -> celerinfer::SidecarBytes {
        if (!has_sidecar) throw celerinfer::ModelFileError("fuzz: sidecar: " + name + ": the sidecar file is missing");
        celerinfer::SidecarBytes b;
        b.data = reinterpret_cast<const uint8_t*>(side.data());
        b.size = side_size;
        return b;
    };
    celerinfer::LoadOptions options;
    options.allow_nonfinite = size > 0 && (data[size - 1] & 1);
    try {
        celerinfer::LoadedModel loaded = celerinfer::parse_model_file("fuzz", json_text, provider, options);
    } catch (const celerinfer::ModelFileError&) {
    }
    return 0;
}
