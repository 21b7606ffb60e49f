// staleflower's native local executors: Leashed-SGD, HOGWILD! and lock-based AsyncSGD on C++ threads over libtorch.
//
// Built on first use (or by `make venv`) with torch.utils.cpp_extension.load; client_app/native/__init__.py is the
// Python side and says which models it accepts. The hot loop never takes the Python interpreter lock: the GIL is
// released for the whole run, and gradients come from libtorch autograd on a functional form of the model (a list
// of layer ops over a flat list of parameter tensors), so no Python runs between kernels.
//
// Leashed-SGD (Baeckstroem, Walulya, Papatriantafilou, Tsigas, IPDPS 2021), with a preallocated pool of 2m + 1
// parameter vectors instead of the reference code's allocate-and-leak:
//   * `latest` is a std::atomic<Slot*>; versions are published with a seq_cst compare_exchange_strong, so the copy
//     and update into a private slot are complete before the slot is visible.
//   * Each slot has one 64-bit control word: the number of readers (low 32 bits) and the slot's state (high bits:
//     FREE, PRIVATE, PUBLISHED, STALE, RECLAIMING). Reading the pair in one atomic load is what makes reclamation
//     safe with recycled slots: a slot is reclaimed by one CAS from exactly {STALE, 0 readers} to RECLAIMING.
//   * A read pins a slot like a hazard pointer: load latest, increment readers, re-load latest; if it moved, undo
//     (and try to reclaim). A slot that is still `latest` after the increment cannot be reclaimed until the
//     matching decrement, so its contents are the published version for the whole read.
//   * A publisher keeps its pin on the vector it copied through the CAS (notes: the reference unpins before its
//     CAS, which with recycled slots is an ABA bug); a pinned slot is never recycled, so `latest == v1` at the CAS
//     means the very version the update was applied to.
//   * Bound: a thread holds at most one pin and one private slot, plus the published slot: 2m + 1. A thread that
//     finds no FREE slot counts a `claim_wait` and scans again (the tests assert it never happens).
//   * verify (tests): every published slot carries a checksum that each reader re-checks when its read ends;
//     reclaimed slots are filled with NaN before they become FREE, and a gradient or loss that is not finite is
//     counted, so a read of freed memory shows.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using torch::Tensor;
using Clock = std::chrono::steady_clock;

enum Op : int64_t { FLATTEN = 0, LINEAR = 1, RELU = 2, CONV2D = 3, MAXPOOL2D = 4 };
enum State : uint64_t { FREE = 0, PRIVATE = 1, PUBLISHED = 2, STALE = 3, RECLAIMING = 4 };
constexpr uint64_t READERS = 0xffffffffULL;

inline uint64_t state_of(uint64_t w) { return w >> 32; }
inline uint64_t with_state(uint64_t w, uint64_t s) { return (w & READERS) | (s << 32); }

struct alignas(64) Slot {
  std::atomic<uint64_t> ctl{0};
  int64_t timestamp = 0;
  double check = 0.0;
  Tensor flat;
  std::vector<Tensor> views;
};

struct alignas(64) PaddedCounter {
  std::atomic<int64_t> value{0};
};

struct ThreadStats {
  int64_t gradients = 0, published = 0, failed_cas = 0, dropped = 0, inconsistent = 0, nan_seen = 0;
  int64_t claim_waits = 0;
  std::vector<int64_t> staleness, attempts;
  std::vector<double> losses, times;
};

struct Config {
  std::string policy;
  std::vector<std::vector<int64_t>> ops;
  Tensor x, y, batches;
  std::vector<Tensor> anchor;
  double lr = 0.0, momentum = 0.0, prox_mu = 0.0;
  int64_t threads = 1, persistence = 200;
  bool verify = false;
  int64_t cas_delay_us = 0;  // tests: sleep between building a vector and its CAS, to force contention
  int64_t rival_wins = -1;   // tests: a rival publishes before each of the first `rival_wins` attempts per gradient
  int64_t test_flags = 0;    // tests: RIVAL_BEFORE_GRADIENT, UNSAFE_EARLY_UNPIN (the negative control)
};

constexpr int64_t RIVAL_BEFORE_GRADIENT = 1;  // a rival publishes between a gradient's read and its computation
constexpr int64_t UNSAFE_EARLY_UNPIN = 2;     // the bug the pin prevents: stop counting as a reader before reading

std::vector<Tensor> layer_views(const Tensor& flat, const std::vector<Tensor>& like) {
  std::vector<Tensor> out;
  int64_t off = 0;
  for (const auto& t : like) {
    out.push_back(flat.narrow(0, off, t.numel()).view(t.sizes()));
    off += t.numel();
  }
  return out;
}

double checksum(const std::vector<Tensor>& ts) {
  // client_app.executors.checksum's formula: position-weighted float64 sum, any change or swap moves it.
  at::NoGradGuard ng;
  double total = 0.0;
  for (size_t i = 0; i < ts.size(); ++i) {
    auto flat = ts[i].reshape(-1).to(torch::kDouble);
    auto w = torch::remainder(torch::arange(flat.numel(), flat.options()), 97) + 1 + static_cast<double>(i);
    total += (flat * w).sum().item<double>();
  }
  return total;
}

bool all_finite(const std::vector<Tensor>& ts) {
  for (const auto& t : ts)
    if (!torch::isfinite(t).all().item<bool>()) return false;
  return true;
}

class Executor {
 public:
  Executor(Config cfg, const std::vector<Tensor>& start) : cfg_(std::move(cfg)), like_(start) {
    steps_ = cfg_.batches.size(0);
    int64_t numel = 0;
    for (const auto& t : start) numel += t.numel();
    auto opts = start.at(0).options();
    const int64_t m = cfg_.threads;
    int64_t slots = cfg_.policy == "leashed" ? 2 * m + 1 : (cfg_.policy == "locked" ? m + 1 : 1);
    pool_ = std::vector<Slot>(static_cast<size_t>(slots));
    for (auto& s : pool_) {
      s.flat = torch::empty({numel}, opts);
      s.views = layer_views(s.flat, start);
    }
    // slot 0 holds the start, published (leashed) or shared (locked, hogwild)
    {
      at::NoGradGuard ng;
      for (size_t i = 0; i < start.size(); ++i) pool_[0].views[i].copy_(start[i]);
    }
    pool_[0].ctl.store(with_state(0, PUBLISHED));
    if (cfg_.verify) pool_[0].check = checksum(pool_[0].views);
    live_.store(1);
    peak_live_.store(1);
    latest_.store(&pool_[0]);
  }

  void run() {
    const int64_t m = cfg_.threads;
    stats_.assign(static_cast<size_t>(m), ThreadStats());
    start_ = Clock::now();
    if (m == 1) {
      work(0);  // on the calling thread: the same intra-op settings as the sequential trainer
    } else {
      std::vector<std::thread> pool;
      for (int64_t j = 0; j < m; ++j) pool.emplace_back([this, j] {
        at::init_num_threads();
        work(j);
      });
      for (auto& t : pool) t.join();
    }
    seconds_ = std::chrono::duration<double>(Clock::now() - start_).count();
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  py::dict report() const {
    py::dict out;
    int64_t g = 0, p = 0, f = 0, d = 0, inc = 0, nan = 0, waits = 0;
    std::vector<int64_t> stale, att;
    std::vector<std::pair<double, double>> trace;
    for (const auto& s : stats_) {
      g += s.gradients; p += s.published; f += s.failed_cas; d += s.dropped; inc += s.inconsistent;
      nan += s.nan_seen; waits += s.claim_waits;
      stale.insert(stale.end(), s.staleness.begin(), s.staleness.end());
      att.insert(att.end(), s.attempts.begin(), s.attempts.end());
      for (size_t i = 0; i < s.losses.size(); ++i) trace.emplace_back(s.times[i], s.losses[i]);
    }
    std::sort(trace.begin(), trace.end());
    int64_t poisoned = 0;
    if (cfg_.verify)
      for (const auto& s : pool_)
        if (state_of(s.ctl.load()) == FREE && s.flat.numel() > 0 && torch::isnan(s.flat).all().item<bool>()) ++poisoned;
    out["seconds"] = seconds_;
    out["gradients"] = g;
    out["published"] = p;
    out["failed_cas"] = f;
    out["dropped"] = d;
    out["inconsistent"] = inc;
    out["nan_seen"] = nan;
    out["claim_waits"] = waits;
    out["peak_live"] = peak_live_.load();
    out["live_end"] = live_.load();
    out["pool_size"] = static_cast<int64_t>(pool_.size());
    out["poisoned_free_slots"] = poisoned;
    out["staleness"] = stale;
    out["attempts"] = att;
    out["trace"] = trace;
    return out;
  }

  std::vector<Tensor> result() const {
    const Slot* v = latest_.load();
    std::vector<Tensor> out;
    for (const auto& t : v->views) out.push_back(t.clone());
    return out;
  }

 private:
  // ------------------------------------------------------------------ the model
  Tensor forward(const std::vector<Tensor>& p, Tensor h) const {
    for (const auto& op : cfg_.ops) {
      switch (op.at(0)) {
        case FLATTEN:
          h = h.flatten(op.at(1), op.at(2));
          break;
        case LINEAR:
          h = at::linear(h, p.at(op.at(1)), op.at(2) >= 0 ? std::optional<Tensor>(p.at(op.at(2))) : std::nullopt);
          break;
        case RELU:
          h = at::relu(h);
          break;
        case CONV2D:
          h = at::conv2d(h, p.at(op.at(1)), op.at(2) >= 0 ? std::optional<Tensor>(p.at(op.at(2))) : std::nullopt,
                         {op.at(3), op.at(4)}, {op.at(5), op.at(6)}, {1, 1}, 1);
          break;
        case MAXPOOL2D:
          h = at::max_pool2d(h, {op.at(1), op.at(2)}, {op.at(3), op.at(4)}, {op.at(5), op.at(6)}, {1, 1}, false);
          break;
        default:
          throw std::runtime_error("unknown layer op " + std::to_string(op.at(0)));
      }
    }
    return h;
  }

  // Loss and gradient on `params` for batch k: the arithmetic of LocalSGD.run, op for op.
  std::vector<Tensor> grad(const std::vector<Tensor>& params, int64_t k, ThreadStats& st) {
    at::AutoGradMode on(true);
    std::vector<Tensor> leaves;
    for (const auto& t : params) leaves.push_back(t.variable_data().requires_grad_(true));  // aliases, own version
    auto idx = cfg_.batches.select(0, k);
    auto out = forward(leaves, cfg_.x.index({idx}));
    auto loss = at::cross_entropy_loss(out, cfg_.y.index({idx}), {}, at::Reduction::Mean, -100, 0.0);
    if (cfg_.prox_mu != 0.0) {  // mu/2 ||w - w_received||^2, summed as Python's sum() does: ((0 + d0) + d1) + ...
      Tensor drift;
      for (size_t i = 0; i < leaves.size(); ++i) {
        auto term = at::pow(leaves[i] - cfg_.anchor.at(i), 2).sum();
        drift = i == 0 ? term + 0 : drift + term;
      }
      loss = loss + drift * (cfg_.prox_mu / 2);
    }
    auto grads = torch::autograd::grad({loss}, leaves);
    double value = loss.item<double>();
    st.gradients += 1;
    st.losses.push_back(value);
    st.times.push_back(std::chrono::duration<double>(Clock::now() - start_).count());
    if (cfg_.verify && (!std::isfinite(value) || !all_finite(grads))) st.nan_seen += 1;
    return std::vector<Tensor>(grads.begin(), grads.end());
  }

  // trainer.Momentum: buf = m buf + g (the first buffer a copy of the first gradient); m = 0: the gradient
  std::vector<Tensor> direction(std::vector<Tensor> grads, std::vector<Tensor>& buf) const {
    if (cfg_.momentum == 0.0) return grads;
    at::NoGradGuard ng;
    if (buf.empty()) {
      for (const auto& g : grads) buf.push_back(g.clone().detach());
    } else {
      for (size_t i = 0; i < buf.size(); ++i) buf[i].mul_(cfg_.momentum).add_(grads[i]);
    }
    return buf;
  }

  void work(int64_t j) {
    try {
      std::vector<Tensor> buf;
      ThreadStats& st = stats_[static_cast<size_t>(j)];
      while (!stop_.load(std::memory_order_relaxed)) {
        int64_t k = next_batch_.value.fetch_add(1);
        if (k >= steps_) break;
        if (cfg_.policy == "leashed") leashed_step(k, j, buf, st);
        else if (cfg_.policy == "locked") locked_step(k, j, buf, st);
        else hogwild_step(k, buf, st);
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> g(error_mu_);
      if (error_.empty()) error_ = e.what();
      stop_.store(true);
    }
  }

  // ------------------------------------------------------------------ Leashed-SGD
  void set_state(Slot* v, uint64_t to) {
    uint64_t w = v->ctl.load();
    while (!v->ctl.compare_exchange_weak(w, with_state(w, to))) {
    }
  }

  void note_live(int64_t delta) {
    int64_t now = live_.fetch_add(delta) + delta;
    int64_t peak = peak_live_.load();
    while (now > peak && !peak_live_.compare_exchange_weak(peak, now)) {
    }
  }

  void try_reclaim(Slot* v) {
    uint64_t expected = with_state(0, STALE);  // stale and no readers, read in one atomic word
    if (!v->ctl.compare_exchange_strong(expected, with_state(0, RECLAIMING))) return;
    if (cfg_.verify) {
      at::NoGradGuard ng;
      v->flat.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    set_state(v, FREE);
    note_live(-1);
  }

  Slot* pin() {
    for (;;) {
      Slot* v = latest_.load();
      v->ctl.fetch_add(1);
      if (latest_.load() == v) return v;
      unpin(v);
    }
  }

  void unpin(Slot* v) {
    v->ctl.fetch_sub(1);
    try_reclaim(v);
  }

  void end_read(Slot* v, ThreadStats& st) {
    if (cfg_.verify && checksum(v->views) != v->check) st.inconsistent += 1;
    unpin(v);
  }

  Slot* claim(int64_t j, ThreadStats& st) {
    const size_t n = pool_.size();
    for (;;) {
      for (size_t i = 0; i < n; ++i) {
        Slot* s = &pool_[(static_cast<size_t>(j) * 2 + i) % n];
        uint64_t w = s->ctl.load();
        if (state_of(w) == FREE && s->ctl.compare_exchange_strong(w, with_state(w, PRIVATE))) {
          note_live(1);
          return s;
        }
      }
      st.claim_waits += 1;  // never expected: 2m + 1 slots suffice (asserted by the tests)
      std::this_thread::yield();
    }
  }

  void release_private(Slot* s) {
    if (cfg_.verify) {
      at::NoGradGuard ng;
      s->flat.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    set_state(s, FREE);
    note_live(-1);
  }

  // tests: another publisher wins the race (adds 1.0 to every entry)
  void rival_publish(int64_t j, ThreadStats& st) {
    Slot* v = pin();
    Slot* s = claim(j, st);
    {
      at::NoGradGuard ng;
      for (size_t i = 0; i < v->views.size(); ++i) at::add_out(s->views[i], v->views[i], 1.0);
    }
    s->timestamp = v->timestamp + 1;
    if (cfg_.verify) s->check = checksum(s->views);
    set_state(s, PUBLISHED);
    Slot* expected = v;
    if (!latest_.compare_exchange_strong(expected, s)) throw std::runtime_error("rival CAS failed");
    set_state(v, STALE);
    rivals_.fetch_add(1);
    unpin(v);
  }

  void leashed_step(int64_t k, int64_t j, std::vector<Tensor>& buf, ThreadStats& st) {
    Slot* v0 = pin();
    const int64_t t0 = v0->timestamp;
    const bool unsafe = (cfg_.test_flags & UNSAFE_EARLY_UNPIN) != 0;
    if (unsafe) unpin(v0);  // negative control only: v0 may now be reclaimed, poisoned and recycled under us
    if (cfg_.test_flags & RIVAL_BEFORE_GRADIENT) rival_publish(j, st);
    std::vector<Tensor> grads;
    try {
      grads = grad(v0->views, k, st);
    } catch (...) {
      if (!unsafe) unpin(v0);
      throw;
    }
    if (!unsafe) end_read(v0, st);
    else if (cfg_.verify && checksum(v0->views) != v0->check) st.inconsistent += 1;
    auto d = direction(std::move(grads), buf);
    for (int64_t attempt = 1; attempt <= cfg_.persistence + 1; ++attempt) {
      Slot* v1 = pin();
      Slot* s = claim(j, st);
      {
        at::NoGradGuard ng;  // copy and apply in one pass, as the Python policy's torch.add(t, g, alpha=-lr)
        for (size_t i = 0; i < d.size(); ++i) at::add_out(s->views[i], v1->views[i], d[i], -cfg_.lr);
      }
      s->timestamp = v1->timestamp + 1;
      if (cfg_.verify) {
        s->check = checksum(s->views);
        if (checksum(v1->views) != v1->check) st.inconsistent += 1;
      }
      if (cfg_.cas_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(cfg_.cas_delay_us));
      if (cfg_.rival_wins >= 0 && attempt <= cfg_.rival_wins) rival_publish(j, st);
      set_state(s, PUBLISHED);
      Slot* expected = v1;  // v1 is still pinned: it cannot have been recycled, so equality means this version
      if (latest_.compare_exchange_strong(expected, s)) {
        const int64_t t1 = v1->timestamp;  // read before the unpin: after it v1 may be recycled
        set_state(v1, STALE);
        unpin(v1);
        st.published += 1;
        st.staleness.push_back(t1 - t0);
        st.attempts.push_back(attempt);
        return;
      }
      set_state(s, PRIVATE);
      release_private(s);
      unpin(v1);
      st.failed_cas += 1;
    }
    st.dropped += 1;
    st.attempts.push_back(cfg_.persistence + 1);
  }

  // ------------------------------------------------------------------ HOGWILD! and lock-based AsyncSGD
  void hogwild_step(int64_t k, std::vector<Tensor>& buf, ThreadStats& st) {
    Slot& shared = pool_[0];
    const int64_t t0 = version_.value.load();
    auto d = direction(grad(shared.views, k, st), buf);
    {
      at::NoGradGuard ng;
      for (size_t i = 0; i < d.size(); ++i) shared.views[i].add_(d[i], -cfg_.lr);
    }
    const int64_t done = version_.value.fetch_add(1);
    st.published += 1;
    st.staleness.push_back(std::max<int64_t>(done - t0, 0));
    st.attempts.push_back(1);
  }

  void locked_step(int64_t k, int64_t j, std::vector<Tensor>& buf, ThreadStats& st) {
    Slot& shared = pool_[0];
    Slot& snap = pool_[static_cast<size_t>(j) + 1];
    int64_t t0;
    {
      std::lock_guard<std::mutex> g(mu_);
      at::NoGradGuard ng;
      for (size_t i = 0; i < snap.views.size(); ++i) snap.views[i].copy_(shared.views[i]);
      t0 = shared.timestamp;
    }
    note_live(1);
    auto d = direction(grad(snap.views, k, st), buf);
    note_live(-1);
    {
      std::lock_guard<std::mutex> g(mu_);
      at::NoGradGuard ng;
      for (size_t i = 0; i < d.size(); ++i) shared.views[i].add_(d[i], -cfg_.lr);
      st.staleness.push_back(shared.timestamp - t0);
      shared.timestamp += 1;
    }
    st.published += 1;
    st.attempts.push_back(1);
  }

  Config cfg_;
  std::vector<Tensor> like_;
  int64_t steps_ = 0;
  std::vector<Slot> pool_;
  alignas(64) std::atomic<Slot*> latest_{nullptr};
  PaddedCounter next_batch_;
  PaddedCounter version_;
  alignas(64) std::atomic<int64_t> live_{0};
  alignas(64) std::atomic<int64_t> peak_live_{0};
  alignas(64) std::atomic<int64_t> rivals_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::mutex error_mu_;
  std::string error_;
  std::vector<ThreadStats> stats_;
  Clock::time_point start_;
  double seconds_ = 0.0;

 public:
  int64_t rivals() const { return rivals_.load(); }
};

py::tuple run(const std::string& policy, const std::vector<std::vector<int64_t>>& ops, const std::vector<Tensor>& start,
              const Tensor& x, const Tensor& y, const Tensor& batches, const std::vector<Tensor>& anchor, double lr,
              double momentum, double prox_mu, int64_t threads, int64_t persistence, bool verify,
              int64_t cas_delay_us, int64_t rival_wins, int64_t test_flags) {
  if (policy != "leashed" && policy != "hogwild" && policy != "locked")
    throw std::invalid_argument("native executor: unknown policy " + policy);
  if (threads < 1 || persistence < 0) throw std::invalid_argument("need threads >= 1 and persistence >= 0");
  if (start.empty()) throw std::invalid_argument("native executor: a model without parameters");
  if (batches.dim() != 2 || batches.scalar_type() != torch::kLong)
    throw std::invalid_argument("batches must be a 2-D int64 tensor");
  Config cfg{policy, ops, x, y, batches, anchor, lr, momentum, prox_mu, threads, persistence, verify,
             cas_delay_us, rival_wins, test_flags};
  std::unique_ptr<Executor> ex;
  std::vector<Tensor> result;
  {
    py::gil_scoped_release nogil;  // from here to the end of the run no Python runs, in any thread
    ex = std::make_unique<Executor>(std::move(cfg), start);
    ex->run();
    result = ex->result();
  }
  py::dict rep = ex->report();
  rep["rival_published"] = ex->rivals();
  return py::make_tuple(result, rep);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "staleflower native local executors (Leashed-SGD, HOGWILD!, lock-based) on C++ threads";
  m.def("run", &run, "Run one task's local steps; returns (final parameters, report dict)", py::arg("policy"),
        py::arg("ops"), py::arg("start"), py::arg("x"), py::arg("y"), py::arg("batches"), py::arg("anchor"),
        py::arg("lr"), py::arg("momentum"), py::arg("prox_mu"), py::arg("threads"), py::arg("persistence"),
        py::arg("verify"), py::arg("cas_delay_us") = 0, py::arg("rival_wins") = -1, py::arg("test_flags") = 0);
  m.attr("ABI") = 2;
}
