// A C interface to libsentencepiece, built as its own shared object. libsentencepiece carries
// its own copy of protobuf, which clashes with libtorch's when both are linked into one process
// (it crashed before main). edkm therefore never links sentencepiece: it dlopen()s this shim
// with RTLD_LOCAL | RTLD_DEEPBIND, so the shim and sentencepiece resolve protobuf's symbols
// within their own dependency tree (see tokenizer/sentencepiece.cpp).
#include <sentencepiece_processor.h>

#include <cstring>
#include <string>
#include <vector>

namespace {
void copy_out(const std::string& s, char* out, int cap) {
  if (cap <= 0) return;
  std::size_t n = std::min<std::size_t>(s.size(), static_cast<std::size_t>(cap - 1));
  std::memcpy(out, s.data(), n);
  out[n] = '\0';
}
}  // namespace

extern "C" {

// A model from its serialized protobuf (the bytes of a .model file).
void* edkm_spm_load(const char* data, int len, char* err, int errlen) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  auto status = sp->LoadFromSerializedProto(std::string_view(data, static_cast<std::size_t>(len)));
  if (!status.ok()) {
    copy_out(status.ToString(), err, errlen);
    delete sp;
    return nullptr;
  }
  return sp;
}

void edkm_spm_free(void* h) { delete static_cast<sentencepiece::SentencePieceProcessor*>(h); }

int edkm_spm_vocab_size(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->GetPieceSize(); }
int edkm_spm_bos_id(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->bos_id(); }
int edkm_spm_eos_id(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->eos_id(); }

// Returns the number of ids; when it exceeds cap only the first cap were written. -1 on error.
int edkm_spm_encode(void* h, const char* text, int len, int* out, int cap) {
  std::vector<int> ids;
  if (!static_cast<sentencepiece::SentencePieceProcessor*>(h)->Encode(std::string(text, len), &ids).ok()) return -1;
  for (int i = 0; i < static_cast<int>(ids.size()) && i < cap; ++i) out[i] = ids[i];
  return static_cast<int>(ids.size());
}

// The piece of an id ("▁the", "<0x0A>"); returns its length.
int edkm_spm_piece(void* h, int id, char* out, int cap) {
  const std::string& p = static_cast<sentencepiece::SentencePieceProcessor*>(h)->IdToPiece(id);
  copy_out(p, out, cap);
  return static_cast<int>(p.size());
}

int edkm_spm_is_byte(void* h, int id) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->IsByte(id); }
int edkm_spm_is_control(void* h, int id) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(h)->IsControl(id);
}

}  // extern "C"
