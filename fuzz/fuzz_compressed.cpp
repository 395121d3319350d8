// libFuzzer target: the compressed-model layout validator on top of the safetensors header
// parser. An input is a whole file; it must be rejected with an InputError or yield a layout in
// which every tensor of the config is accounted for exactly once.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/error.h"
#include "format/format.h"
#include "model/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view file(reinterpret_cast<const char*>(data), size);
  try {
    auto header = edkm::safetensors::parse_header(file, size, "fuzz");
    auto layout = edkm::parse_layout(header, "fuzz");
    if (layout.packed.size() + layout.dense.size() != edkm::tensor_shapes(layout.config).size()) std::abort();
  } catch (const edkm::InputError&) {
  }
  return 0;
}
