// libFuzzer target: the GGUF header validator and the block dequantizers. Any input must either
// be rejected with an InputError or yield tensors that lie inside the file and dequantize there;
// anything else (a crash, another exception, a sanitizer report) is a bug.
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "model/io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view file(reinterpret_cast<const char*>(data), size);
  try {
    const auto h = edkm::gguf::parse_header(file, "fuzz");
    for (const auto& t : h.tensors) {
      if (h.data_start + t.offset + t.bytes > size) std::abort();
      const int64_t row = t.ne[0];
      if (row > (1 << 16)) continue;  // one row is enough to exercise the block code
      std::vector<float> out(row);
      edkm::gguf::dequantize(t.type, data + h.data_start + t.offset, row, out.data());
    }
  } catch (const edkm::InputError&) {
  }
  return 0;
}
