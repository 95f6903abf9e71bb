#pragma once
// Byte-pair encoding over raw bytes. A piece starts as one token per byte; the adjacent pair with the lowest merge
// rank is merged (the leftmost on ties) until no adjacent pair has a merge. Hugging Face's BPE (ranks from the merges
// list) and tiktoken (rank of the concatenated token) are both this rule, so one model serves both file formats.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/string_table.h"

namespace mamba3 {

class BpeModel {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  // Adds a regular token (its raw bytes). Fails if the bytes or the id are already present.
  // Returns false (adding nothing) when the bytes are already there.
  bool add_token(uint32_t id, std::string_view bytes);
  // Declares that tokens `left` and `right` merge into `merged` with priority `rank` (lower first). A later
  // declaration of the same pair replaces the earlier one (as a Hugging Face merges list with duplicates does).
  void add_merge(uint32_t left, uint32_t right, uint32_t rank, uint32_t merged);
  // tiktoken's rule: every token of two or more bytes is the merge of each split into two tokens, ranked by its id.
  void add_merges_from_ranks();
  // When set, a piece that is itself a token is emitted as that token without merging (tiktoken; Hugging Face's
  // `ignore_merges`).
  void set_whole_piece_lookup(bool on) { whole_piece_ = on; }

  std::optional<uint32_t> find(std::string_view bytes) const;
  size_t token_count() const { return token_ids_.size(); }
  // Encodes a piece that is not a single byte nor (with whole-piece lookup) a token itself.
  void merge(std::string_view piece, std::vector<uint32_t>& out) const {
    if (piece.size() <= 96)
      merge_scan(piece, out);
    else
      merge_heap(piece, out);
  }
  bool whole_piece_lookup() const { return whole_piece_; }
  size_t merge_count() const { return pair_count_; }

  // Encodes one piece (non-empty), appending its ids to `out`. Throws mamba3::Error when a byte has no token.
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;
  // The two merge loops, exposed so tests can check they agree: quadratic scan (fast for short pieces) and heap.
  void merge_scan(std::string_view piece, std::vector<uint32_t>& out) const;
  void merge_heap(std::string_view piece, std::vector<uint32_t>& out) const;

 private:
  struct Pair {
    uint64_t key = kEmpty;
    uint32_t rank = 0, merged = 0;
  };
  static constexpr uint64_t kEmpty = UINT64_MAX;
  static uint64_t pair_key(uint32_t l, uint32_t r) { return uint64_t(l) << 32 | r; }
  const Pair* find_pair(uint32_t l, uint32_t r) const;
  void grow_pairs();
  uint32_t byte_token(unsigned char b) const;

  StringTable<uint32_t> token_ids_;
  uint32_t byte_ids_[256];
  bool byte_ids_init_ = false;
  std::vector<Pair> pairs_;  // open addressing, linear probing, power-of-two size
  size_t pair_count_ = 0;
  bool whole_piece_ = false;
};

}  // namespace mamba3
