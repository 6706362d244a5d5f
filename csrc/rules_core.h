// The early-warning rules of healthmon/rules.py (the reference) in C++: one decoded step's
// rows -> findings, with the same per-site histories, streaks and episodes, in the same
// order and with the same float64 arithmetic (std::log10 / std::sqrt are the libm calls
// Python's math module makes), so the findings are identical (tests/test_native_rules.py
// compares the two on random and real runs). Torch-free: plain doubles; the Python glue
// (rules.cpp) feeds it row pointers into the host copies of the record buffers.
//
// Why: in Python the rules cost ~3 us per row, so a 400-row step paid 1.2-2 ms and the time
// budget ran them on every 5th-7th step only (a spike on a skipped step was never judged).
// Here a row costs a few tens of nanoseconds and the rules run on every step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "record.h"

namespace healthmon {
namespace rules {

// Phases, as healthmon/native_rules.py numbers them (kOther: any other string).
enum Phase : int { kInput = 0, kForward, kBackward, kGrad, kLoss, kParam, kLabel, kOther,
                   kNumPhases };
// Finding kinds, as healthmon/native_rules.py names them.
enum Kind : int { kOverflow = 0, kDead, kSpike, kGrowth, kVanishing, kFrozen, kNumKinds };
enum Streak : int { kStreakDead = 0, kStreakVanishing, kStreakFrozen, kNumStreaks };

// WarnConfig's fields (healthmon/rules.py), counts as int64.
struct Config {
  double headroom, spike_factor, spike_mad, spike_floor, loss_floor;
  int64_t window, min_history, growth_steps;
  double growth_factor;
  int64_t dead_steps, frozen_steps;
  double vanish_ratio;
  int64_t vanish_steps;
  double converged_ratio;
  int64_t rearm_steps;
};

// What the glue needs to write a finding's detail (healthmon.rules.*_detail).
struct Found {
  int64_t pos = 0;      // index of the row in the step's execution order
  int kind = 0;
  int64_t count = 0;    // dead / vanishing / frozen: the streak; growth: the rises
  bool has_med = false;
  double med = 0.0;     // spike / vanishing: log10 median of the site's history
  int64_t records = 0;  // spike: records in the history
  double first = 0.0;   // growth: log10 metric growth_steps records ago
  bool has_loss = false;
  double loss = 0.0;    // vanishing: the step's loss
};

// The last `cap` values pushed (a deque with maxlen): at(0) is the oldest. Also kept
// sorted (a binary-search insert / erase per push), so the median costs nothing. Storage is
// allocated on the first push: most sites never keep a history in one of their two rings.
class Ring {
 public:
  explicit Ring(int64_t cap = 1) : cap_(static_cast<size_t>(std::max<int64_t>(cap, 1))) {}
  int64_t size() const { return n_; }
  double at(int64_t i) const { return v_[(start_ + static_cast<size_t>(i)) % cap_]; }
  // values are never NaN (log10 of a positive metric), so the order is total
  void push(double x) {
    if (v_.empty()) {
      v_.resize(cap_);
      sorted_.reserve(cap_);
    }
    if (static_cast<size_t>(n_) < cap_) {
      v_[(start_ + static_cast<size_t>(n_)) % cap_] = x;
      ++n_;
    } else {
      sorted_.erase(std::lower_bound(sorted_.begin(), sorted_.end(), v_[start_]));
      v_[start_] = x;
      start_ = (start_ + 1) % cap_;
    }
    sorted_.insert(std::upper_bound(sorted_.begin(), sorted_.end(), x), x);
  }
  // Python's rules._median of the values (the mean of the middle two when even)
  double median() const {
    const size_t n = sorted_.size();
    return n % 2 ? sorted_[n / 2] : 0.5 * (sorted_[n / 2 - 1] + sorted_[n / 2]);
  }

 private:
  size_t cap_;
  std::vector<double> v_;
  std::vector<double> sorted_;
  size_t start_ = 0;
  int64_t n_ = 0;
};

// rules._median of arbitrary values (sorts them).
inline double median_of(std::vector<double>& s) {
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

class Engine {
 public:
  explicit Engine(const Config& c) : cfg_(c), loss_hist_(c.window) {}

  // A site's fixed facts; returns its id. fmax <= 0: not a low-precision dtype.
  int64_t add_site(int phase, bool allow_inf, double fmax, double tiny, int64_t param_key) {
    Site s;
    s.phase = (phase >= 0 && phase < kNumPhases) ? phase : kOther;
    s.allow_inf = allow_inf;
    s.fmax = fmax;
    s.tiny = tiny;
    s.param_key = param_key;
    s.hist[0] = Ring(cfg_.window);
    s.hist[1] = Ring(cfg_.window);
    sites_.push_back(s);
    if (param_key >= 0 && static_cast<size_t>(param_key) >= params_.size())
      params_.resize(static_cast<size_t>(param_key) + 1);
    return static_cast<int64_t>(sites_.size()) - 1;
  }

  // Site `id`'s dtype changed (model.half() mid-run): the limits of its new dtype.
  void set_site_limits(int64_t id, double fmax, double tiny) {
    if (id < 0 || static_cast<size_t>(id) >= sites_.size()) return;
    sites_[id].fmax = fmax;
    sites_[id].tiny = tiny;
  }

  int64_t num_sites() const { return static_cast<int64_t>(sites_.size()); }

  // Rules.evaluate: rows[i] (kNumStatsFields doubles) is site ids[i]'s record, execution order.
  std::vector<Found> evaluate(const int64_t* ids, const double* const* rows, int64_t n) {
    std::vector<Found> out;
    bool train = false, bad = false;
    for (int64_t i = 0; i < n; ++i) {
      const Site& s = sites_[ids[i]];
      const double* r = rows[i];
      train = train || s.phase == kBackward || s.phase == kGrad || s.phase == kLoss;
      bad = bad || (r[kFinite] < r[kNumel] && !s.allow_inf && s.phase != kLabel);
    }
    bool has_loss = false;
    double loss_now = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double* r = rows[i];
      if (sites_[ids[i]].phase != kLoss || r[kFinite] == 0.0) continue;
      const bool first_loss = !has_loss;
      has_loss = true;
      loss_now = r[kAbsMax];
      if (static_cast<int64_t>(loss_ref_.size()) < cfg_.min_history) loss_ref_.push_back(loss_now);
      if (first_loss && loss_now > 0) loss_hist_.push(std::log10(loss_now));
    }
    const bool loss_rising = loss_is_rising();
    const bool has_ref = !loss_ref_.empty();
    const double loss_ref = has_ref ? *std::max_element(loss_ref_.begin(), loss_ref_.end()) : 0.0;
    const bool converged = has_loss && has_ref && loss_now < cfg_.converged_ratio * loss_ref;
    double top[kNumPhases] = {};
    for (int64_t i = 0; i < n; ++i) {
      const double* r = rows[i];
      const int p = sites_[ids[i]].phase;
      if (r[kFinite] == r[kNumel]) {
        const double m = metric(p, r);
        if (m > top[p]) top[p] = m;
      }
    }
    const double log_spike = std::log10(cfg_.spike_factor);
    const double log_growth = std::log10(cfg_.growth_factor);
    const double log_vanish = std::log10(cfg_.vanish_ratio);
    for (int64_t i = 0; i < n; ++i) {
      Site& s = sites_[ids[i]];
      const double* r = rows[i];
      const int p = s.phase;
      if (p == kInput || p == kLabel) continue;  // the user's data: not the model's health
      if (p == kParam) {
        frozen(s, r, i, out);
        continue;
      }
      const double numel = r[kNumel], finite = r[kFinite];
      if (finite < numel || numel == 0) continue;  // non-finite: an anomaly, an error
      if (p == kForward || p == kBackward || p == kGrad || p == kLoss) {
        const bool cond = s.fmax > 0 && r[kAbsMax] > cfg_.headroom * s.fmax;
        if (fire(s, kOverflow, cond)) out.push_back(found(i, kOverflow));
      }
      if (train && (p == kGrad || (p == kForward && numel >= 2))) {
        const int64_t k = count(s, kStreakDead, r[kZeros] == numel);
        if (fire(s, kDead, k >= cfg_.dead_steps)) {
          Found f = found(i, kDead);
          f.count = k;
          out.push_back(f);
        }
      }
      const double m = metric(p, r);
      if (p == kGrad && s.param_key >= 0)
        params_[s.param_key].live = (r[kZeros] < numel && m >= cfg_.spike_floor * top[p]) ? 1 : 0;
      if (!(m > 0)) continue;
      const double lm = std::log10(m);
      Ring& hist = s.hist[train ? 1 : 0];
      const bool has_med = hist.size() >= cfg_.min_history;
      const double med = has_med ? hist.median() : 0.0;
      // spike: far above the site's own recent history
      bool cond = false;
      if (has_med && (p == kLoss || m >= cfg_.spike_floor * top[p])) {
        double base = med;
        if (p == kLoss && has_ref && loss_ref != 0.0)
          base = std::max(med, std::log10(cfg_.loss_floor * loss_ref));
        if (lm - base > log_spike) {  // the MAD only when needed
          scratch_.clear();
          for (int64_t j = 0; j < hist.size(); ++j) scratch_.push_back(std::fabs(hist.at(j) - med));
          const double mad = median_of(scratch_);
          cond = lm - med > cfg_.spike_mad * 1.4826 * mad;
        }
      }
      if (fire(s, kSpike, cond)) {
        Found f = found(i, kSpike);
        f.has_med = true;
        f.med = med;
        f.records = hist.size();
        out.push_back(f);
      }
      // sustained exponential growth
      cond = false;
      double first = 0.0;
      int64_t rises = 0;
      const int64_t g = cfg_.growth_steps;
      if (loss_rising && hist.size() >= g && lm - hist.at(hist.size() - g) > log_growth) {
        first = hist.at(hist.size() - g);
        double prev = first;
        for (int64_t j = hist.size() - g + 1; j <= hist.size(); ++j) {
          const double v = j < hist.size() ? hist.at(j) : lm;
          rises += v > prev;
          prev = v;
        }
        cond = lm - first > log_growth && rises >= 0.8 * static_cast<double>(g) &&
               (p == kLoss || m >= cfg_.spike_floor * top[p]);
      }
      if (fire(s, kGrowth, cond)) {
        Found f = found(i, kGrowth);
        f.first = first;
        f.count = rises;
        out.push_back(f);
      }
      // vanishing gradient
      if (p == kGrad) {
        const bool collapsed = r[kAbsMax] < s.tiny || (has_med && lm - med < log_vanish);
        const int64_t k = count(s, kStreakVanishing, collapsed && !converged);
        if (fire(s, kVanishing, k >= cfg_.vanish_steps)) {
          Found f = found(i, kVanishing);
          f.count = k;
          f.has_med = has_med;
          f.med = med;
          f.has_loss = has_loss;
          f.loss = loss_now;
          out.push_back(f);
        }
      }
      hist.push(lm);
    }
    if (bad) out.clear();  // a step with an anomaly: its neighbours are consequences
    return out;
  }

 private:
  struct Site {
    int phase = kOther;
    bool allow_inf = false;
    double fmax = 0.0, tiny = 0.0;
    int64_t param_key = -1;
    Ring hist[2];  // log10 metric, [evaluation steps, training steps]
    int64_t streak[kNumStreaks] = {};
    int64_t episode[kNumKinds] = {-1, -1, -1, -1, -1, -1};  // clear records since; -1: none
  };
  struct Param {  // (module, name, role) of a parameter: its param and grad sites meet here
    bool has_prev = false;
    double prev[kNumStatsFields] = {};
    int live = -1;  // the gradient of this step is "live": -1 not seen, 0 no, 1 yes
  };

  static double metric(int phase, const double* r) {
    return (phase == kBackward || phase == kGrad) ? std::sqrt(r[kSumSq]) : r[kAbsMax];
  }

  bool loss_is_rising() {
    const int64_t g = cfg_.growth_steps, n = loss_hist_.size();
    if (n <= g) return true;  // no evidence either way
    scratch_.clear();
    for (int64_t j = std::max<int64_t>(0, n - 3); j < n; ++j) scratch_.push_back(loss_hist_.at(j));
    const double now = median_of(scratch_);
    scratch_.clear();
    for (int64_t j = std::max<int64_t>(0, n - g - 2); j < n - g + 1; ++j)
      scratch_.push_back(loss_hist_.at(j));
    return now - median_of(scratch_) > std::log10(2.0);
  }

  // True when cond starts a new (kind, site) episode; rearm_steps clear records end one.
  bool fire(Site& s, int kind, bool cond) {
    int64_t& e = s.episode[kind];
    if (cond) {
      const bool fresh = e < 0;
      e = 0;
      return fresh;
    }
    if (e >= 0) e = (e + 1 >= cfg_.rearm_steps) ? -1 : e + 1;
    return false;
  }

  static int64_t count(Site& s, int streak, bool cond) {
    s.streak[streak] = cond ? s.streak[streak] + 1 : 0;
    return s.streak[streak];
  }

  static Found found(int64_t pos, int kind) {
    Found f;
    f.pos = pos;
    f.kind = kind;
    return f;
  }

  void frozen(Site& s, const double* r, int64_t pos, std::vector<Found>& out) {
    bool cond = false;
    if (s.param_key >= 0) {
      Param& p = params_[s.param_key];
      const bool same = p.has_prev && std::equal(r, r + kNumStatsFields, p.prev);
      std::copy(r, r + kNumStatsFields, p.prev);
      p.has_prev = true;
      cond = same && p.live == 1;
      p.live = -1;
    }
    const int64_t k = count(s, kStreakFrozen, cond);
    if (fire(s, kFrozen, k >= cfg_.frozen_steps)) {
      Found f = found(pos, kFrozen);
      f.count = k;
      out.push_back(f);
    }
  }

  Config cfg_;
  std::vector<Site> sites_;
  std::vector<Param> params_;
  std::vector<double> loss_ref_;  // the first min_history loss values
  Ring loss_hist_;                // log10 |loss|, the first loss record of each step
  std::vector<double> scratch_;
};

}  // namespace rules
}  // namespace healthmon
