// Error reporting conventions shared by every module.
//
// std::invalid_argument: the caller passed something out of range (bits = 9, tau <= 0, a
// palette of the wrong shape). InputError: a file or data set is missing, corrupt or
// unsupported; the message always names the file (or item) and the problem. EDKM_ASSERT:
// an internal invariant, which only a bug in edkm breaks.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace edkm {

class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void throw_invalid(fmt::format_string<Args...> f, Args&&... args) {
  throw std::invalid_argument(fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void throw_input(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...));
}

[[noreturn]] inline void assert_failed(const char* cond, const char* file, int line) {
  throw std::logic_error(fmt::format("internal error: {}:{}: {} does not hold; this is a bug in edkm, please report it",
                                     file, line, cond));
}

}  // namespace edkm

// A precondition that the code establishes elsewhere (a check made by a caller, a property of a
// data structure) and that a loop relies on for memory safety: cheap, so kept in release
// builds, and placed outside the innermost loops.
#define EDKM_ASSERT(cond)                                                 \
  do {                                                                     \
    if (__builtin_expect(!(cond), 0)) ::edkm::assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)
