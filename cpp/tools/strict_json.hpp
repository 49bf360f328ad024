// Strict JSON for untrusted files: nlohmann/json's DOM builder behind a SAX filter that refuses
// nesting deeper than MAX_NESTING and a key repeated in one object *while parsing*, so a hostile
// file never reaches a recursive copy, dump or destruction of a deep value. nlohmann itself
// refuses NaN/Infinity literals, numbers that overflow a double, lone surrogates, invalid UTF-8
// and anything after the top value; a leading UTF-8 byte-order mark is skipped.
#pragma once
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "model_file_limits.hpp"

namespace celerinfer {

using json = nlohmann::json;

namespace strict_json_detail {

// Printable ASCII only, at most `limit` bytes: untrusted text never reaches a message raw.
inline std::string printable(std::string_view text, size_t limit = 80) {
    std::string out;
    for (size_t i = 0; i < text.size() && i < limit; ++i) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (c >= 0x20 && c < 0x7f) {
            out += char(c);
        } else {
            static const char hex[] = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (text.size() > limit) out += "...";
    return out;
}

class Sax {
public:
    explicit Sax(json& root) : dom_(root, false) {}
    std::string error;  // set when a callback refuses

    bool null() { return dom_.null(); }
    bool boolean(bool v) { return dom_.boolean(v); }
    bool number_integer(json::number_integer_t v) { return dom_.number_integer(v); }
    bool number_unsigned(json::number_unsigned_t v) { return dom_.number_unsigned(v); }
    bool number_float(json::number_float_t v, const json::string_t& s) { return dom_.number_float(v, s); }
    bool string(json::string_t& v) { return dom_.string(v); }
    bool binary(json::binary_t& v) { return dom_.binary(v); }
    bool start_object(std::size_t n) {
        if (!enter()) return false;
        keys_.emplace_back();
        return dom_.start_object(n);
    }
    bool key(json::string_t& k) {
        if (!keys_.back().insert(k).second) {
            error = "the key '" + printable(k) + "' appears twice in one object";
            return false;
        }
        return dom_.key(k);
    }
    bool end_object() {
        --depth_;
        keys_.pop_back();
        return dom_.end_object();
    }
    bool start_array(std::size_t n) { return enter() && dom_.start_array(n); }
    bool end_array() {
        --depth_;
        return dom_.end_array();
    }
    bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) {
        // ex.what() quotes the last token read: keep it short and printable.
        error = "not valid JSON at byte " + std::to_string(position) + " (" + printable(ex.what(), 160) + ")";
        return false;
    }

private:
    bool enter() {
        if (++depth_ > MAX_NESTING) {
            error = "JSON nested deeper than " + std::to_string(MAX_NESTING) + " levels (MAX_NESTING)";
            return false;
        }
        return true;
    }
    nlohmann::detail::json_sax_dom_parser<json> dom_;
    std::vector<std::set<std::string>> keys_;  // the keys seen in each open object
    int64_t depth_ = 0;
};

}  // namespace strict_json_detail

// Parse `text` strictly. On refusal return false and set `error` (no exception, `out` discarded).
inline bool parse_strict_json(std::string_view text, json& out, std::string& error) {
    json root;
    strict_json_detail::Sax sax(root);
    bool ok = false;
    try {
        ok = json::sax_parse(text.data(), text.data() + text.size(), &sax, json::input_format_t::json, true, false);
    } catch (const std::bad_alloc&) {
        throw;
    } catch (const std::exception& e) {  // nlohmann reports through parse_error(); this is belt and braces
        sax.error = "not valid JSON (" + strict_json_detail::printable(e.what(), 160) + ")";
        ok = false;
    }
    if (!ok) {
        error = sax.error.empty() ? std::string("not valid JSON") : sax.error;
        return false;
    }
    out = std::move(root);
    return true;
}

}  // namespace celerinfer
