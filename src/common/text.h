// Text inputs (training data, --text files, prompts) must be UTF-8: a tokenizer given arbitrary
// bytes still produces tokens, and a binary file would silently become training data.
#pragma once

#include <string>
#include <string_view>

namespace edkm {

// InputError "{source}: not UTF-8 text: invalid byte 0xNN at byte offset K" at the first
// malformed sequence (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF), or
// "... NUL byte at byte offset K" for a NUL, which no text file holds.
void check_utf8(std::string_view text, const std::string& source);

}  // namespace edkm
