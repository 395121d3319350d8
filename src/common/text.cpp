#include "common/text.h"

#include "common/atomic_file.h"
#include "common/error.h"

namespace edkm {

void check_utf8(std::string_view text, const std::string& source) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned c = s[i];
    if (c == 0) throw_input("{}: not UTF-8 text: NUL byte at byte offset {}", source, i);
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Lead byte: the sequence length and the range its second byte must fall in (RFC 3629's
    // table, which excludes overlong forms, surrogates and code points above U+10FFFF).
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else throw_input("{}: not UTF-8 text: invalid byte 0x{:02X} at byte offset {}", source, c, i);
    for (size_t k = 1; k < len; ++k) {
      const size_t at = i + k;
      if (at >= n) throw_input("{}: not UTF-8 text: truncated sequence at byte offset {}", source, i);
      const unsigned b = s[at];
      if (b < (k == 1 ? lo : 0x80u) || b > (k == 1 ? hi : 0xBFu))
        throw_input("{}: not UTF-8 text: invalid byte 0x{:02X} at byte offset {}", source, b, at);
    }
    i += len;
  }
}

size_t heldout_offset(const std::string& text, double fraction) {
  if (!(fraction >= 0 && fraction < 1)) throw_invalid("held-out fraction must be in [0, 1), got {}", fraction);
  if (fraction == 0) return text.size();
  const size_t pos = static_cast<size_t>((1 - fraction) * static_cast<double>(text.size()));
  if (pos == 0 || text[pos - 1] == '\n') return pos;
  const size_t nl = text.find('\n', pos);
  if (nl != std::string::npos) return nl + 1;
  size_t p = pos;
  while (p < text.size() && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) ++p;
  return p;
}

std::string read_heldout_text(const std::string& path, double fraction) {
  std::string text = read_file(path);
  check_utf8(text, path);
  if (fraction > 0) text.erase(0, heldout_offset(text, fraction));
  if (text.empty()) throw_input("{}: nothing left to score after holding out the last {}", path, fraction);
  return text;
}

}  // namespace edkm
