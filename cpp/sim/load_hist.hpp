// A latency histogram for the load generator: log-linear buckets (32 per power of two, so any
// percentile is within ~3% of the true value), fixed size, no allocation, add() is a few
// instructions. Values are nanoseconds.
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx5tlp::sim {

class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 5;  // 32 sub-buckets per octave
  static constexpr unsigned kSub = 1u << kSubBits;
  static constexpr unsigned kBuckets = (64 - kSubBits + 1) * kSub;

  void add(uint64_t v) {
    ++b_[index(v)];
    ++n_;
    sum_ += v;
    if (v < min_) min_ = v;
    if (v > max_) max_ = v;
  }
  uint64_t count() const { return n_; }
  uint64_t min() const { return n_ ? min_ : 0; }
  uint64_t max() const { return max_; }
  double mean() const { return n_ ? double(sum_) / double(n_) : 0.0; }

  // The value below which a fraction q of the samples lie: the middle of the bucket holding
  // the ceil(q * n)-th smallest sample, clamped to [min, max]. 0 without samples.
  uint64_t percentile(double q) const {
    if (n_ == 0) return 0;
    uint64_t rank = uint64_t(q * double(n_) + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n_) rank = n_;
    uint64_t seen = 0;
    for (unsigned i = 0; i < kBuckets; ++i) {
      seen += b_[i];
      if (seen >= rank) {
        uint64_t v = middle(i);
        return v < min_ ? min_ : v > max_ ? max_ : v;
      }
    }
    return max_;
  }

 private:
  static unsigned index(uint64_t v) {
    if (v < kSub) return unsigned(v);
    const unsigned e = 63u - unsigned(__builtin_clzll(v));  // >= kSubBits
    return (e - kSubBits + 1) * kSub + unsigned((v >> (e - kSubBits)) & (kSub - 1));
  }
  static uint64_t middle(unsigned i) {
    if (i < kSub) return i;
    const unsigned e = i / kSub + kSubBits - 1;
    const uint64_t width = uint64_t(1) << (e - kSubBits);
    return ((uint64_t(kSub) + (i % kSub)) << (e - kSubBits)) + width / 2;
  }

  uint64_t b_[kBuckets] = {};
  uint64_t n_ = 0, sum_ = 0, min_ = ~uint64_t(0), max_ = 0;
};

}  // namespace mlx5tlp::sim
