// healthmon._C.RulesEngine: the Python glue of the C++ early-warning rules (rules_core.h).
//
// The monitor registers each site once (add_site), hands over the step's execution order
// when it changes (set_order: site id, buffer index, slot per row) and then, every decoded
// step, only the host copies of its record buffers (evaluate_order): no Python per row.
// evaluate() takes explicit rows (float64 [n, kNumStatsFields]) for tests and for callers
// without buffers. Findings come back as tuples; healthmon/native_rules.py words them.
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "rules_core.h"

namespace healthmon {
namespace {

namespace py = pybind11;
using rules::Config;
using rules::Engine;
using rules::Found;

Config config_from(const py::dict& d) {
  auto f = [&](const char* name) { return d[name].cast<double>(); };
  auto i = [&](const char* name) { return d[name].cast<int64_t>(); };
  Config c;
  c.headroom = f("headroom");
  c.spike_factor = f("spike_factor");
  c.spike_mad = f("spike_mad");
  c.spike_floor = f("spike_floor");
  c.loss_floor = f("loss_floor");
  c.window = i("window");
  c.min_history = i("min_history");
  c.growth_steps = i("growth_steps");
  c.growth_factor = f("growth_factor");
  c.dead_steps = i("dead_steps");
  c.frozen_steps = i("frozen_steps");
  c.vanish_ratio = f("vanish_ratio");
  c.vanish_steps = i("vanish_steps");
  c.converged_ratio = f("converged_ratio");
  c.rearm_steps = i("rearm_steps");
  if (c.window < 2 || c.growth_steps < 1 || c.growth_steps >= c.window)
    throw std::invalid_argument("healthmon: RulesEngine needs 1 <= growth_steps < window");
  return c;
}

py::list to_python(const std::vector<Found>& found) {
  py::list out;
  for (const Found& f : found) {
    out.append(py::make_tuple(f.pos, f.kind, f.count,
                              f.has_med ? py::object(py::float_(f.med)) : py::object(py::none()),
                              f.records, f.first,
                              f.has_loss ? py::object(py::float_(f.loss)) : py::object(py::none())));
  }
  return out;
}

void check_rows(const at::Tensor& t, const char* what) {
  if (t.device().type() != at::kCPU || t.scalar_type() != at::kDouble || t.dim() != 2 ||
      t.size(1) != kNumStatsFields || !t.is_contiguous())
    throw std::invalid_argument(std::string("healthmon: RulesEngine ") + what +
                                " must be contiguous CPU float64 tensors [rows, " +
                                std::to_string(kNumStatsFields) + "], got " +
                                t.toString() + " " + std::to_string(t.dim()) + "-d");
}

class RulesEngine {
 public:
  explicit RulesEngine(const py::dict& config) : engine_(config_from(config)) {}

  int64_t add_site(int phase, bool allow_inf, double fmax, double tiny, int64_t param_key) {
    return engine_.add_site(phase, allow_inf, fmax, tiny, param_key);
  }

  void set_site_limits(int64_t id, double fmax, double tiny) {
    engine_.set_site_limits(id, fmax, tiny);
  }

  void set_order(std::vector<int64_t> ids, std::vector<int64_t> buffers,
                 std::vector<int64_t> slots) {
    if (ids.size() != buffers.size() || ids.size() != slots.size())
      throw std::invalid_argument("healthmon: RulesEngine.set_order: lengths differ");
    for (int64_t id : ids) check_id(id);
    ids_ = std::move(ids);
    buffers_ = std::move(buffers);
    slots_ = std::move(slots);
  }

  // The step's rows, read from hosts[buffer][slot] in the order of set_order.
  py::list evaluate_order(const std::vector<at::Tensor>& hosts) {
    for (const at::Tensor& h : hosts) check_rows(h, "host buffers");
    std::vector<const double*> rows(ids_.size());
    for (size_t i = 0; i < ids_.size(); ++i) {
      const int64_t b = buffers_[i], slot = slots_[i];
      if (b < 0 || b >= static_cast<int64_t>(hosts.size()) || slot < 0 ||
          slot >= hosts[b].size(0))
        throw std::out_of_range("healthmon: RulesEngine: row " + std::to_string(i) +
                                " (buffer " + std::to_string(b) + ", slot " +
                                std::to_string(slot) + ") is not in the host buffers");
      rows[i] = hosts[b].data_ptr<double>() + slot * kNumStatsFields;
    }
    return to_python(engine_.evaluate(ids_.data(), rows.data(), static_cast<int64_t>(rows.size())));
  }

  // Explicit rows: rows[i] is site ids[i]'s record.
  py::list evaluate(const std::vector<int64_t>& ids, const at::Tensor& rows) {
    check_rows(rows, "rows");
    if (rows.size(0) != static_cast<int64_t>(ids.size()))
      throw std::invalid_argument("healthmon: RulesEngine.evaluate: one row per site id");
    for (int64_t id : ids) check_id(id);
    std::vector<const double*> ptrs(ids.size());
    for (size_t i = 0; i < ids.size(); ++i)
      ptrs[i] = rows.data_ptr<double>() + static_cast<int64_t>(i) * kNumStatsFields;
    return to_python(engine_.evaluate(ids.data(), ptrs.data(), static_cast<int64_t>(ids.size())));
  }

 private:
  void check_id(int64_t id) const {
    if (id < 0 || id >= engine_.num_sites())
      throw std::out_of_range("healthmon: RulesEngine: unknown site id " + std::to_string(id));
  }

  Engine engine_;
  std::vector<int64_t> ids_, buffers_, slots_;
};

}  // namespace

void register_rules(py::module& m) {
  py::class_<RulesEngine>(m, "RulesEngine",
                          "The early-warning rules in C++ (see csrc/rules_core.h)")
      .def(py::init<const py::dict&>(), py::arg("config"))
      .def("add_site", &RulesEngine::add_site, py::arg("phase"), py::arg("allow_inf"),
           py::arg("fmax"), py::arg("tiny"), py::arg("param_key"))
      .def("set_site_limits", &RulesEngine::set_site_limits, py::arg("id"), py::arg("fmax"),
           py::arg("tiny"))
      .def("set_order", &RulesEngine::set_order, py::arg("ids"), py::arg("buffers"),
           py::arg("slots"))
      .def("evaluate_order", &RulesEngine::evaluate_order, py::arg("hosts"))
      .def("evaluate", &RulesEngine::evaluate, py::arg("ids"), py::arg("rows"));
}

}  // namespace healthmon
