// Error reporting conventions shared by every module.
//
// std::invalid_argument: the caller passed something out of range (bits = 9, tau <= 0, a
// palette of the wrong shape). InputError: a file or data set is missing, corrupt or
// unsupported; the message always names the file (or item) and the problem.
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

}  // namespace edkm
