#include "pipeline/export.h"

#include "common/atomic_file.h"
#include "format/format.h"
#include "model/io/hf.h"

namespace edkm {

std::string export_hf(const std::string& file, const std::string& out_dir, at::ScalarType dtype) {
  check_outputs_distinct({out_dir + "/config.json", out_dir + "/model.safetensors"}, {{"FILE", file}});
  CompressedModel m = read_compressed(file);
  save_hf_dir(m.to_llama(dtype), out_dir, dtype, m.tokenizer().get());
  return m.tokenizer_name;
}

}  // namespace edkm
