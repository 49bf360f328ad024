// base_line_micro model.json out_dir
// Reads a model file, runs the C++ forward on its inputs, prints load and forward times, and
// writes out_dir/logits_cpp.npy. Environment: WARMUP (default 1), REPEAT (default 10),
// KERNELS (a registered kernel set: fast, the default, or readable) and THREADS (default: every core).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model_file.hpp"

namespace ci = celerinfer;
using Clock = std::chrono::steady_clock;

static double ms_since(Clock::time_point start) {
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

static int env_int(const char* name, int fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::atoi(v) : fallback;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s model.json out_dir\n", argv[0]);
        return 2;
    }
    try {
        auto start = Clock::now();
        ci::LoadedModel loaded = ci::load_model_file(argv[1]);
        const double load_ms = ms_since(start);
        const ci::Config& c = loaded.model->config;
        const char* kernels_env = std::getenv("KERNELS");
        const std::string kernels = kernels_env && *kernels_env ? kernels_env : "fast";
        if (env_int("THREADS", 0) > 0) ci::set_num_threads(env_int("THREADS", 0));
        start = Clock::now();
        const std::unique_ptr<ci::KernelSet> set = ci::make_kernels(kernels, loaded.model.get());
        const double pack_ms = ms_since(start);
        ci::Workspace ws(c, loaded.batch, loaded.seq_len);
        std::vector<float> logits(size_t(loaded.batch) * loaded.seq_len * c.vocab);
        auto run = [&] {
            ci::run_forward(*set, *loaded.model, loaded.input_ids.data(), loaded.attention_mask.data(), loaded.seq_len,
                            0, ws, logits.data(), nullptr);
        };
        for (int i = 0, n = env_int("WARMUP", 1); i < n; ++i) run();
        std::vector<double> times;
        for (int i = 0, n = std::max(1, env_int("REPEAT", 10)); i < n; ++i) {
            start = Clock::now();
            run();
            times.push_back(ms_since(start));
        }
        std::sort(times.begin(), times.end());
        const double median = times[times.size() / 2];
        float lo = logits[0], hi = logits[0];
        double sum = 0;
        for (float v : logits) { lo = std::min(lo, v); hi = std::max(hi, v); sum += v; }
        std::filesystem::create_directories(argv[2]);
        const std::string out = std::string(argv[2]) + "/logits_cpp.npy";
        ci::write_npy(out, logits.data(), {loaded.batch, loaded.seq_len, c.vocab});
        std::printf("model: %s (batch %d x seq %d)\n", argv[1], loaded.batch, loaded.seq_len);
        std::printf("load: %.3f ms\n", load_ms);
        std::printf("kernels: %s, %d threads (preparing %.3f ms)\n", kernels.c_str(), ci::num_threads(), pack_ms);
        std::printf("forward: median %.3f ms (min %.3f, max %.3f; %zu runs)\n", median, times.front(), times.back(), times.size());
        std::printf("logits: shape [%d, %d, %d] min %.6f max %.6f mean %.6f\n", loaded.batch, loaded.seq_len, c.vocab,
                    lo, hi, sum / double(logits.size()));
        std::printf("saved %s\n", out.c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
