// lfm2-runner: the native program an adb agent runs on a phone (devices/adb/README in the
// project README, "Measuring on an Android phone"). It loads one GGUF with llama.cpp and then
// answers one command per line on stdin with one JSON line on stdout, so that the host drives
// the same sampling loop (devices/sampling.py) as a local measurement while every timed
// interval is measured here, on the phone's own clock:
//
//   prefill T        clear the memory, decode T tokens (one batch, logits for the last): {"ms"}
//   decode D K       a D-token context (built once by a prefill of D-1 tokens, then restored from
//                    a saved sequence state, as llama-bench does), one untimed decode at D-1,
//                    then K timed decodes at D..D+K-1: {"ms"} is the mean per token
//   calibrate        a fixed kernel (one thread of fp32 multiply-adds over 4 MiB arrays, the
//                    same as devices.sampling.Calibration), median of 5: {"ms"}
//   memory           {"rss_bytes", "hwm_bytes"} from /proc/self/status (VmRSS, VmHWM)
//   quit             exit 0
//
// Settings follow devices/backends/llamacpp_runner.py (and llama-bench): weights memory-mapped,
// n_batch 2048, n_ubatch 512, an f16 K/V cache, flash attention "auto", one sequence. The
// first line it prints is {"event":"ready", ...} with the load time and the RSS baseline (after
// the backend is initialised, before the model is loaded); the peak RSS mark is reset after the
// baseline (/proc/self/clear_refs), so hwm - baseline is the model's own footprint.
//
// Build: see CMakeLists.txt next to this file.

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#ifndef LFM2_RUNNER_VERSION
#define LFM2_RUNNER_VERSION "unknown"
#endif

static const int N_BATCH = 2048;
static const int N_UBATCH = 512;

static std::string g_last_error;

static void log_callback(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR && text) {  // keep llama.cpp's errors for our messages, drop the chatter
        g_last_error = text;
        while (!g_last_error.empty() && (g_last_error.back() == '\n' || g_last_error.back() == '\r')) g_last_error.pop_back();
    }
}

static std::string json_escape(const std::string & s) {
    std::string out;
    for (char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\t': out += "\\t"; break;
            default:
                if ((unsigned char) c < 0x20) { char buf[8]; snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
                else out += c;
        }
    }
    return out;
}

static void reply(const std::string & json) {
    fputs(json.c_str(), stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

static void fail(const std::string & what) {
    std::string detail = g_last_error.empty() ? "" : " (llama.cpp said: " + g_last_error + ")";
    reply("{\"error\":\"" + json_escape(what + detail) + "\"}");
}

// VmRSS / VmHWM in bytes from /proc/self/status; -1 where absent.
static long long status_bytes(const char * field) {
    std::ifstream in("/proc/self/status");
    std::string line;
    size_t n = strlen(field);
    while (std::getline(in, line)) {
        if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') {
            return std::atoll(line.c_str() + n + 1) * 1024LL;
        }
    }
    return -1;
}

static bool reset_peak_rss() {
    FILE * f = fopen("/proc/self/clear_refs", "w");
    if (!f) return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Runner {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    llama_memory_t memory = nullptr;
    int n_vocab = 0;
    int n_ctx = 0;
    int next_pos = 0;
    int snapshot_pos = -1;
    std::vector<uint8_t> snapshot;
    uint64_t rng = 0x9E3779B97F4A7C15ULL;

    llama_token random_token() {  // xorshift64*: token values do not change the latency
        rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
        return (llama_token) ((rng * 2685821657736338717ULL) >> 33) % n_vocab;
    }

    bool decode(std::vector<llama_token> & tokens, std::string & err) {
        if (next_pos + (int) tokens.size() > n_ctx) {
            err = "positions " + std::to_string(next_pos) + ".." + std::to_string(next_pos + tokens.size() - 1) + " exceed the context of " + std::to_string(n_ctx);
            return false;
        }
        for (size_t start = 0; start < tokens.size(); start += N_BATCH) {
            int n = (int) std::min<size_t>(N_BATCH, tokens.size() - start);
            llama_batch batch = llama_batch_get_one(tokens.data() + start, n);
            int status = llama_decode(ctx, batch);
            if (status != 0) {
                err = "llama_decode of " + std::to_string(n) + " tokens at position " + std::to_string(next_pos) + " returned " + std::to_string(status);
                return false;
            }
            next_pos += n;
        }
        return true;
    }

    void clear() { llama_memory_clear(memory, true); next_pos = 0; }

    bool seek(int pos, std::string & err) {  // the memory holds a pos-token context
        clear();
        if (pos == 0) return true;
        if (snapshot_pos != pos) {
            snapshot.clear(); snapshot_pos = -1;  // one snapshot at a time
            std::vector<llama_token> filler(pos, 0);
            if (!decode(filler, err)) return false;
            size_t size = llama_state_seq_get_size(ctx, 0);
            snapshot.resize(size);
            if (llama_state_seq_get_data(ctx, snapshot.data(), size, 0) != size) { err = "llama_state_seq_get_data failed"; return false; }
            snapshot_pos = pos;
            return true;
        }
        if (llama_state_seq_set_data(ctx, snapshot.data(), snapshot.size(), 0) != snapshot.size()) { err = "llama_state_seq_set_data failed"; return false; }
        next_pos = pos;
        return true;
    }
};

static double calibration_once() {
    const size_t n = (4u << 20) / sizeof(float);
    static std::vector<float> a, b, out;
    if (a.empty()) {
        a.resize(n); b.assign(n, 0.5f); out.resize(n);
        for (size_t i = 0; i < n; i++) a[i] = (float) i / (float) (n - 1);
    }
    double start = now_ms();
    for (int pass = 0; pass < 6; pass++) {
        for (size_t i = 0; i < n; i++) out[i] = a[i] * b[i];
        for (size_t i = 0; i < n; i++) out[i] = out[i] + a[i];
    }
    volatile float sink = 0;
    for (size_t i = 0; i < n; i += 4096) sink = sink + out[i];
    (void) sink;
    return now_ms() - start;
}

static void usage() {
    fprintf(stderr, "usage: lfm2-runner --model FILE.gguf --ctx N --threads N [--seed N]\n       lfm2-runner --version\n");
}

int main(int argc, char ** argv) {
    std::string model_path;
    int n_ctx = 0, threads = 1;
    unsigned long long seed = 0;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        auto value = [&](const char * name) -> const char * {
            if (i + 1 >= argc) { fprintf(stderr, "%s needs a value\n", name); usage(); exit(2); }
            return argv[++i];
        };
        if (arg == "--model") model_path = value("--model");
        else if (arg == "--ctx") n_ctx = atoi(value("--ctx"));
        else if (arg == "--threads") threads = atoi(value("--threads"));
        else if (arg == "--seed") seed = strtoull(value("--seed"), nullptr, 10);
        else if (arg == "--version") {
            llama_log_set(log_callback, nullptr);
            llama_backend_init();
            reply(std::string("{\"runner\":\"lfm2-runner\",\"version\":\"") + LFM2_RUNNER_VERSION + "\",\"system_info\":\"" + json_escape(llama_print_system_info()) + "\"}");
            return 0;
        } else { fprintf(stderr, "unknown argument %s\n", arg.c_str()); usage(); return 2; }
    }
    if (model_path.empty() || n_ctx < 1 || threads < 1) { usage(); return 2; }

    llama_log_set(log_callback, nullptr);
    llama_backend_init();
    long long baseline = status_bytes("VmRSS");
    bool peak_reset = reset_peak_rss();

    Runner r;
    r.n_ctx = n_ctx;
    r.rng ^= seed * 0xD1B54A32D192ED03ULL;
    double start = now_ms();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mode = LLAMA_LOAD_MODE_MMAP;
    r.model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!r.model) { fail("llama.cpp could not load " + model_path); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = N_BATCH;
    cp.n_ubatch = N_UBATCH;
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.no_perf = true;
    r.ctx = llama_init_from_model(r.model, cp);
    if (!r.ctx) { fail("llama.cpp could not create a context of " + std::to_string(n_ctx) + " tokens"); return 1; }
    r.memory = llama_get_memory(r.ctx);
    r.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(r.model));
    double load_ms = now_ms() - start;

    std::ostringstream ready;
    ready << "{\"event\":\"ready\",\"pid\":" << getpid() << ",\"version\":\"" << LFM2_RUNNER_VERSION << "\""
          << ",\"load_ms\":" << load_ms << ",\"baseline_rss_bytes\":" << baseline << ",\"peak_reset\":" << (peak_reset ? "true" : "false")
          << ",\"rss_after_load_bytes\":" << status_bytes("VmRSS") << ",\"n_vocab\":" << r.n_vocab << ",\"n_ctx\":" << n_ctx
          << ",\"threads\":" << threads << ",\"model_bytes\":" << llama_model_size(r.model)
          << ",\"system_info\":\"" << json_escape(llama_print_system_info()) << "\"}";
    reply(ready.str());

    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string command;
        in >> command;
        std::string err;
        g_last_error.clear();
        if (command == "prefill") {
            int t = 0;
            in >> t;
            if (t < 1) { fail("prefill needs a positive token count"); continue; }
            std::vector<llama_token> tokens(t);
            for (auto & token : tokens) token = r.random_token();
            double t0 = now_ms();
            r.clear();
            bool ok = r.decode(tokens, err);
            double ms = now_ms() - t0;
            if (!ok) { fail(err); continue; }
            std::ostringstream o; o << "{\"ms\":" << ms << "}"; reply(o.str());
        } else if (command == "decode") {
            int depth = 0, k = 0;
            in >> depth >> k;
            if (depth < 1 || k < 1) { fail("decode needs a depth >= 1 and a token count >= 1"); continue; }
            std::vector<llama_token> one(1, r.random_token());
            if (!r.seek(depth - 1, err) || !r.decode(one, err)) { fail(err); continue; }  // untimed: the state of a depth-token context
            double total = 0;
            bool ok = true;
            for (int i = 0; i < k && ok; i++) {
                one[0] = r.random_token();
                double t0 = now_ms();
                ok = r.decode(one, err);
                total += now_ms() - t0;
            }
            if (!ok) { fail(err); continue; }
            std::ostringstream o; o << "{\"ms\":" << total / k << "}"; reply(o.str());
        } else if (command == "calibrate") {
            calibration_once();  // first touch of the pages
            std::vector<double> times;
            for (int i = 0; i < 5; i++) times.push_back(calibration_once());
            std::sort(times.begin(), times.end());
            std::ostringstream o; o << "{\"ms\":" << times[2] << "}"; reply(o.str());
        } else if (command == "memory") {
            std::ostringstream o; o << "{\"rss_bytes\":" << status_bytes("VmRSS") << ",\"hwm_bytes\":" << status_bytes("VmHWM") << "}"; reply(o.str());
        } else if (command == "quit") {
            break;
        } else if (!command.empty()) {
            fail("unknown command " + command);
        }
    }
    llama_free(r.ctx);
    llama_model_free(r.model);
    llama_backend_free();
    return 0;
}
