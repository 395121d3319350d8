// libFuzzer target: the safetensors header validator. Any input must either be rejected with an
// InputError or yield spans that tile the data buffer exactly; anything else (a crash, another
// exception, a sanitizer report) is a bug.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/error.h"
#include "model/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view file(reinterpret_cast<const char*>(data), size);
  try {
    auto h = edkm::safetensors::parse_header(file, size, "fuzz");
    uint64_t at = 0;
    for (const auto& t : h.tensors) {
      if (t.begin != at || t.end < t.begin) std::abort();
      at = t.end;
    }
    if (h.data_start + at != size) std::abort();
  } catch (const edkm::InputError&) {
  }
  return 0;
}
