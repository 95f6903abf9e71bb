#include "tasks/state_tracking.h"

#include "core/error.h"

namespace mamba3::tasks {

namespace {

int64_t mod5(int64_t v) { return ((v % kModulus) + kModulus) % kModulus; }

// Appends a random expression of exactly n characters from Delétang's bracket grammar; returns its value mod 5.
int64_t append_bracket_expression(int64_t n, TaskRng& rng, std::vector<int64_t>& out) {
  if (n <= 4) {
    const int64_t d = rng.below(kModulus);
    const bool neg = n == 2 || n == 4, paren = n >= 3;
    if (paren) out.push_back(kOpen);
    if (neg) out.push_back(kMinus);
    out.push_back(kDigit0 + d);
    if (paren) out.push_back(kClose);
    return neg ? mod5(-d) : d;
  }
  const int64_t left = rng.between(1, n - 4), right = n - 3 - left;
  const bool plus = rng.below(2) == 0;
  out.push_back(kOpen);
  const int64_t a = append_bracket_expression(left, rng, out);
  out.push_back(plus ? kPlus : kMinus);
  const int64_t b = append_bracket_expression(right, rng, out);
  out.push_back(kClose);
  return mod5(plus ? a + b : a - b);
}

}  // namespace

int64_t TaskSpec::valid_length(int64_t n) const {
  if (odd_lengths_only && n % 2 == 0) --n;
  MAMBA3_CHECK(n >= 1, "task {}: length {} is not valid (lengths start at 1)", name, n);
  return n;
}

std::vector<std::string> task_names() { return {"parity", "mod_arith", "mod_arith_brackets"}; }

TaskSpec task_spec(const std::string& name) {
  // Train 3…40, test beyond 40 up to 256 (Grazzi et al. 2024); mod_arith rounds lengths down to odd values.
  if (name == "parity") return {name, TaskKind::Parity, 3, 40, {40, 64, 128, 256}, 2, false, Labels::Prefix};
  if (name == "mod_arith")
    return {name, TaskKind::ModArith, 3, 39, {39, 63, 127, 255}, kModulus, true, Labels::Prefix};
  if (name == "mod_arith_brackets")
    return {name, TaskKind::ModArithBrackets, 3, 40, {40, 64, 128, 256}, kModulus, false, Labels::Final};
  fail("unknown task '{}' (tasks: parity, mod_arith, mod_arith_brackets)", name);
}

Labels parse_labels(const std::string& name) {
  if (name == "final") return Labels::Final;
  if (name == "prefix") return Labels::Prefix;
  fail("labels must be 'final' or 'prefix', got '{}'", name);
}

std::string labels_name(Labels labels) { return labels == Labels::Final ? "final" : "prefix"; }

TaskRng TaskRng::stream(uint64_t seed, uint64_t a, uint64_t b) {
  TaskRng r(seed ^ 0x6a09e667f3bcc909ULL);
  const uint64_t s1 = r.next() ^ (a * 0x9e3779b97f4a7c15ULL);
  TaskRng r2(s1);
  const uint64_t s2 = r2.next() ^ (b * 0xbf58476d1ce4e5b9ULL);
  return TaskRng(s2);
}

uint64_t TaskRng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

int64_t TaskRng::below(int64_t n) {
  MAMBA3_CHECK(n >= 1, "TaskRng::below: n must be ≥ 1, got {}", n);
  const uint64_t un = uint64_t(n), limit = UINT64_MAX - UINT64_MAX % un;  // reject the biased tail
  uint64_t v;
  do v = next();
  while (v >= limit);
  return int64_t(v % un);
}

int64_t TaskRng::between(int64_t lo, int64_t hi) { return lo + below(hi - lo + 1); }

int64_t sample_train_length(const TaskSpec& spec, TaskRng& rng) {
  if (!spec.odd_lengths_only) return rng.between(spec.train_min, spec.train_max);
  const int64_t lo = spec.train_min / 2, hi = (spec.train_max - 1) / 2;  // odd n = 2k + 1 in [min, max]
  return 2 * rng.between(lo, hi) + 1;
}

Example generate_example(const TaskSpec& spec, int64_t n, TaskRng& rng) {
  MAMBA3_CHECK(n >= 1 && (!spec.odd_lengths_only || n % 2 == 1), "task {}: length {} is not valid{}", spec.name, n,
               spec.odd_lengths_only ? " (expressions have odd length)" : "");
  Example ex;
  ex.ids.reserve(size_t(n + 2));
  ex.ids.push_back(kStart);
  ex.labels.assign(size_t(n + 2), -1);
  switch (spec.kind) {
    case TaskKind::Parity: {
      int64_t parity = 0;
      for (int64_t t = 1; t <= n; ++t) {
        const int64_t bit = rng.below(2);
        parity ^= bit;
        ex.ids.push_back(kDigit0 + bit);
        if (spec.labels == Labels::Prefix) ex.labels[size_t(t)] = parity;  // running parity of x_1 … x_t
      }
      ex.answer = parity;
      break;
    }
    case TaskKind::ModArith: {
      // Left to right with precedence: total of the finished terms, the current product term and its sign.
      int64_t total = 0, term = 0, sign = 1;
      for (int64_t t = 0; t < n; ++t) {
        if (t % 2 == 0) {
          const int64_t d = rng.below(kModulus);
          ex.ids.push_back(kDigit0 + d);
          // ids[0] is '^', so the operator just before this digit (expression position t − 1) is ids[t].
          term = t == 0 || ex.ids[size_t(t)] != kTimes ? d : mod5(term * d);
          if (spec.labels == Labels::Prefix) ex.labels[size_t(t + 1)] = mod5(total + sign * term);  // x_1 … x_{t+1}
        } else {
          const int64_t op = kPlus + rng.below(3);
          ex.ids.push_back(op);
          if (op != kTimes) {
            total = mod5(total + sign * term);
            sign = op == kPlus ? 1 : -1;
          }
        }
      }
      ex.answer = mod5(total + sign * term);
      break;
    }
    case TaskKind::ModArithBrackets:
      ex.answer = append_bracket_expression(n, rng, ex.ids);
      break;
  }
  ex.ids.push_back(kEquals);
  ex.labels[size_t(n + 1)] = ex.answer;
  MAMBA3_CHECK(int64_t(ex.ids.size()) == n + 2, "task {}: internal: generated {} ids for length {}", spec.name,
               ex.ids.size(), n);
  return ex;
}

std::string ids_to_text(const std::vector<int64_t>& ids) {
  static const char kChars[] = "01234+-*()=^";
  std::string s;
  for (int64_t id : ids) s += id >= 0 && id < kVocabSize ? kChars[id] : '?';
  return s;
}

}  // namespace mamba3::tasks
