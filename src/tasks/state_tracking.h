#pragma once
// Synthetic state-tracking tasks in the style of the formal-language benchmark of Delétang et al. 2023 ("Neural
// Networks and the Chomsky Hierarchy"), with the train/test length split of Grazzi et al. 2024 ("Unlocking
// State-Tracking in Linear RNNs Through Negative Eigenvalues"), which the Mamba-3 paper follows: train on short
// sequences, test on longer ones. docs/state_tracking.md documents the format in full.
//
// One vocabulary for every task (12 ids):
//   0–4 the digits '0'…'4' (parity bits are '0' and '1'; answers are digits too)
//   5 '+'   6 '-'   7 '*'   8 '('   9 ')'   10 '='   11 '^' (start of sequence)
// An example of length n is the token sequence  ^ x_1 … x_n =  (n + 2 ids); the answer is read at '='.
//   parity              x = n bits; answer = (number of 1s) mod 2.
//   mod_arith           x = an expression d (op d)* of odd length n, d ∈ 0…4, op ∈ {+, -, *} uniform; usual
//                       precedence (* before + and -, left to right); answer = value mod 5 (Delétang's
//                       "modular arithmetic", regular).
//   mod_arith_brackets  x = an expression of exactly n characters from Delétang's grammar (context-free):
//                       n = 1: d, 2: -d, 3: (d), 4: (-d), n ≥ 5: (E op F) with |E| uniform in [1, n − 4],
//                       |F| = n − 3 − |E|, op ∈ {+, -} uniform (their default, without *); answer = value mod 5.
// Labels (where the loss is taken): always at '=' (the answer). With Labels::Prefix also after every proper prefix
// that is itself a complete input: parity after every bit (the running parity of x_1…x_t), mod_arith after every
// digit (the value of the expression x_1…x_t); the bracket grammar has no complete proper prefix, so its labels
// are the answer only either way. Defaults: prefix for parity and mod_arith, final for mod_arith_brackets (see
// docs/state_tracking.md for why).
// Generation is a pure function of (task, length, seed): the random source is our own (SplitMix64 with rejection
// sampling), so examples are identical on every platform and standard library.
#include <cstdint>
#include <string>
#include <vector>

namespace mamba3::tasks {

enum TokenId : int64_t {
  kDigit0 = 0,
  kPlus = 5,
  kMinus = 6,
  kTimes = 7,
  kOpen = 8,
  kClose = 9,
  kEquals = 10,
  kStart = 11,
};
constexpr int64_t kVocabSize = 12;
constexpr int64_t kModulus = 5;

enum class TaskKind { Parity, ModArith, ModArithBrackets };
enum class Labels { Final, Prefix };

struct TaskSpec {
  std::string name;
  TaskKind kind;
  int64_t train_min, train_max;       // lengths n drawn uniformly in [train_min, train_max] (odd only: mod_arith)
  std::vector<int64_t> test_lengths;  // default evaluation lengths (the first is the longest training length)
  int64_t classes;                    // answers are the ids 0 … classes − 1 (2 for parity, 5 otherwise)
  bool odd_lengths_only;              // mod_arith: expressions have odd length
  Labels labels;                      // where the loss is taken (above)

  // The nearest valid length ≤ n (mod_arith: odd); throws if there is none.
  int64_t valid_length(int64_t n) const;
};

// "parity", "mod_arith" or "mod_arith_brackets"; anything else throws naming the valid names.
TaskSpec task_spec(const std::string& name);
// "final" or "prefix"; anything else throws.
Labels parse_labels(const std::string& name);
std::string labels_name(Labels labels);
std::vector<std::string> task_names();

// Deterministic random numbers: SplitMix64 (Steele, Lea & Flood 2014), uniform integers by rejection.
class TaskRng {
 public:
  explicit TaskRng(uint64_t seed) : state_(seed) {}
  // A stream for (seed, a, b): distinct streams for distinct (a, b), e.g. (step, 0) or (length, sample).
  static TaskRng stream(uint64_t seed, uint64_t a, uint64_t b);
  uint64_t next();
  int64_t below(int64_t n);                // uniform in [0, n), n ≥ 1
  int64_t between(int64_t lo, int64_t hi);  // uniform in [lo, hi]

 private:
  uint64_t state_;
};

struct Example {
  std::vector<int64_t> ids;     // ^ x_1 … x_n =   (n + 2)
  std::vector<int64_t> labels;  // same length: the label of the output at each position, −1 where there is none
  int64_t answer = 0;           // the label at '='
};

// One example of length n (n must be valid for the task: ≥ 1, odd for mod_arith).
Example generate_example(const TaskSpec& spec, int64_t n, TaskRng& rng);
// Training length for one batch: uniform over the task's valid training lengths.
int64_t sample_train_length(const TaskSpec& spec, TaskRng& rng);

// Human-readable form of ids, e.g. "^(1+-3)=" (for docs, errors and tests).
std::string ids_to_text(const std::vector<int64_t>& ids);

}  // namespace mamba3::tasks
