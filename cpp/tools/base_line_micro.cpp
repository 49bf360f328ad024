// base_line_micro [--allow-nonfinite] model.json out_dir
// base_line_micro [--allow-nonfinite] --check FILE...
// base_line_micro --print-config FILE
//
// Normal mode reads a model file, runs the C++ forward on its inputs, prints load and forward
// times, and writes out_dir/logits_cpp.npy. Environment: WARMUP (default 1), REPEAT (default 10),
// KERNELS (a registered kernel set: fast, the default, or readable) and THREADS (default: every core),
// KV_CACHE (f32, the default, or bf16: each new key and value rounded to bfloat16 as it joins the
// cache, as the Python side's --kv-cache bf16; it changes the logits of a prefill too).
//
// --check validates and loads each FILE fully (every check of docs/model-file.md, values
// included; no forward) and prints one line per file: "ok<TAB>FILE<TAB>weights FORMAT" (FORMAT: the
// file's weight_format, f32, bf16 or q8) or "refused<TAB>FILE<TAB>message".
//
// --print-config prints the C++ Config the file's config maps to, one "member=value" line each
// (tests/test_config_mapping.py checks it against the Config native.py builds from ModelConfig).
//
// --allow-nonfinite accepts NaN/Inf in weights and the RoPE cache (for studying NaN behaviour).
//
// Exit codes: 0 ok; 2 a usage error or a refused model file (celerinfer::ModelFileError; with
// --check: any file refused); 1 any other failure (out of memory, cannot write the output, ...).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>
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

static int usage(const char* argv0) {
    std::fprintf(stderr,
                 "usage: %s [--allow-nonfinite] model.json out_dir\n"
                 "       %s [--allow-nonfinite] --check FILE...\n"
                 "       %s --print-config FILE\n",
                 argv0, argv0, argv0);
    return 2;
}

// One line per file; 0 when every file is accepted, 2 when one is refused, 1 on another failure.
static int check_files(const std::vector<std::string>& files, const ci::LoadOptions& options) {
    int status = 0;
    for (const std::string& file : files) {
        try {
            ci::LoadedModel loaded = ci::load_model_file(file, options);
            std::printf("ok\t%s\tweights %s\n", file.c_str(), loaded.weight_format.c_str());
        } catch (const ci::ModelFileError& e) {
            std::string msg = e.what();
            std::replace(msg.begin(), msg.end(), '\n', ' ');
            std::replace(msg.begin(), msg.end(), '\t', ' ');
            std::printf("refused\t%s\t%s\n", file.c_str(), msg.c_str());
            status = std::max(status, 2);
        } catch (const std::exception& e) {
            std::printf("error\t%s\t%s\n", file.c_str(), e.what());
            std::fflush(stdout);
            std::fprintf(stderr, "error: %s: %s\n", file.c_str(), e.what());
            return 1;
        }
    }
    if (std::fflush(stdout) != 0) return 1;
    return status;
}

// Runs `body` and returns its exit code; a refused model file: 2, any other failure: 1, the message
// on stderr.
template <typename Body>
static int reporting_errors(Body&& body) {
    try {
        return body();
    } catch (const ci::ModelFileError& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}

// Every member of ci::Config, under its C++ name (the enum as its integer value).
static int print_config(const std::string& file) {
    const ci::Config c = ci::load_model_file(file, ci::LoadOptions{}).model->config;
    std::printf("hidden=%d\nlayers=%d\nheads=%d\nkv_heads=%d\nhead_dim=%d\nvocab=%d\n", c.hidden, c.layers, c.heads,
                c.kv_heads, c.head_dim, c.vocab);
    std::printf("intermediate=%d\nmax_pos=%d\neps=%.9g\nqk_norm=%d\nrope_interleaved=%d\ntied=%d\n", c.intermediate,
                c.max_pos, double(c.eps), int(c.qk_norm), int(c.rope_interleaved), int(c.tied));
    std::printf("moe=%d\nexperts=%d\ntopk=%d\nshared_experts=%d\nmoe_intermediate=%d\ntopk_renorm=%d\n", int(c.moe),
                c.experts, c.topk, c.shared_experts, c.moe_intermediate, int(c.topk_renorm));
    return std::fflush(stdout) == 0 ? 0 : 1;
}

// The command line: --allow-nonfinite and --check before the files; `usage` when it is not one of
// the three forms.
struct Args {
    ci::LoadOptions options;
    bool check = false;
    bool usage = false;
    std::vector<std::string> files;  // --check: the files; else model.json and out_dir
};

static Args parse_args(int argc, char** argv) {
    Args out;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (!out.check && a == "--allow-nonfinite") out.options.allow_nonfinite = true;
        else if (!out.check && a == "--check") out.check = true;
        else if (!out.check && a.size() > 1 && a[0] == '-' && a[1] == '-') {
            out.usage = true;
            return out;
        } else {
            out.files.push_back(a);
        }
    }
    out.usage = out.check ? out.files.empty() : out.files.size() != 2;
    return out;
}

// WARMUP untimed runs, then REPEAT (at least 1) timed ones; their times in ms, sorted.
template <typename Run>
static std::vector<double> time_runs(Run&& run) {
    for (int i = 0, n = env_int("WARMUP", 1); i < n; ++i) run();
    std::vector<double> times;
    for (int i = 0, n = std::max(1, env_int("REPEAT", 10)); i < n; ++i) {
        const auto start = Clock::now();
        run();
        times.push_back(ms_since(start));
    }
    std::sort(times.begin(), times.end());
    return times;
}

struct Summary {
    float lo, hi;
    double mean;
};

static Summary summarize(const std::vector<float>& logits) {
    Summary s{logits[0], logits[0], 0};
    for (float v : logits) {
        s.lo = std::min(s.lo, v);
        s.hi = std::max(s.hi, v);
        s.mean += v;
    }
    s.mean /= double(logits.size());
    return s;
}

// The normal mode: load, prepare the kernel set, time the forwards, write the logits, print the report.
static int run_model(const std::string& model_path, const std::string& out_dir, const ci::LoadOptions& options,
                     ci::KVFormat kv_format) {
    auto start = Clock::now();
    ci::LoadedModel loaded = ci::load_model_file(model_path, options);
    const double load_ms = ms_since(start);
    const ci::Config& c = loaded.model->config;
    const char* kernels_env = std::getenv("KERNELS");
    const std::string kernels = kernels_env && *kernels_env ? kernels_env : "fast";
    if (env_int("THREADS", 0) > 0) ci::set_num_threads(env_int("THREADS", 0));
    start = Clock::now();
    const std::unique_ptr<ci::KernelSet> set = ci::make_kernels(kernels, loaded.model.get());
    const double pack_ms = ms_since(start);
    ci::Workspace ws(c, loaded.batch, loaded.seq_len);
    ws.kv_format = kv_format;
    std::vector<float> logits(size_t(loaded.batch) * loaded.seq_len * c.vocab);
    const std::vector<double> times = time_runs([&] {
        ci::run_forward(*set, *loaded.model, loaded.input_ids.data(), loaded.attention_mask.data(), loaded.seq_len, 0,
                        ws, logits.data(), nullptr);
    });
    const Summary sum = summarize(logits);
    std::filesystem::create_directories(out_dir);
    const std::string out = out_dir + "/logits_cpp.npy";
    ci::write_npy(out, logits.data(), {loaded.batch, loaded.seq_len, c.vocab});
    std::printf("model: %s (batch %d x seq %d)\n", model_path.c_str(), loaded.batch, loaded.seq_len);
    std::printf("load: %.3f ms\n", load_ms);
    const bool reads_stored = set->weight_format() != ci::WeightFormat::F32;
    std::printf("weights: %s%s\n", loaded.weight_format.c_str(),
                loaded.weight_format == "f32" || reads_stored ? "" : " (these kernels read their float32 decoding)");
    std::printf("kernels: %s, %d threads (preparing %.3f ms)\n", kernels.c_str(), ci::num_threads(), pack_ms);
    std::printf("kv cache: %s\n", kv_format == ci::KVFormat::BF16 ? "bf16" : "f32");
    std::printf("forward: median %.3f ms (min %.3f, max %.3f; %zu runs)\n", times[times.size() / 2], times.front(),
                times.back(), times.size());
    std::printf("logits: shape [%d, %d, %d] min %.6f max %.6f mean %.6f\n", loaded.batch, loaded.seq_len, c.vocab,
                sum.lo, sum.hi, sum.mean);
    std::printf("saved %s\n", out.c_str());
    return std::fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
    if (argc == 3 && std::strcmp(argv[1], "--print-config") == 0)
        return reporting_errors([&] { return print_config(argv[2]); });
    const Args args = parse_args(argc, argv);
    if (args.usage) return usage(argv[0]);
    if (args.check) return check_files(args.files, args.options);
    const char* kv_env = std::getenv("KV_CACHE");
    const std::string kv = kv_env && *kv_env ? kv_env : "f32";
    if (kv != "f32" && kv != "bf16") {
        std::fprintf(stderr, "error: KV_CACHE=%s: must be f32 or bf16\n", kv.c_str());
        return 2;
    }
    const ci::KVFormat kv_format = kv == "bf16" ? ci::KVFormat::BF16 : ci::KVFormat::F32;
    return reporting_errors([&] { return run_model(args.files[0], args.files[1], args.options, kv_format); });
}
