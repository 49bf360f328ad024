// Checks that throw: NDEBUG is defined under cppyy, so assert() would check nothing.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#ifndef CELERINFER_NS
#define CELERINFER_NS celerinfer
#endif

namespace CELERINFER_NS {

template <typename... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
    std::ostringstream msg;
    (msg << ... << parts);
    throw std::runtime_error(msg.str());
}

}  // namespace CELERINFER_NS

// CI_CHECK(cond, "message parts", value, ...): throw std::runtime_error when cond is false.
#define CI_CHECK(cond, ...) \
    do { if (!(cond)) ::CELERINFER_NS::fail(__VA_ARGS__); } while (0)
