// healthmon._C.ParamPlan: the monitor's parameter records of one phase (every parameter's
// gradient after a backward, every weight after the optimizer step) in one C++ call.
//
// The monitor builds a plan once the parameters' sites are known (Monitor._record_param_batch):
// which parameters, the dtype and device of each tensor, which buffer rows they go to and
// the sites to append to the step's order. record() re-checks, for every parameter, that the
// tensor to record (the parameter or its .grad) is still a plain strided tensor of that dtype
// and device, and only then records them (one multi-tensor op per buffer) and appends the
// order entries; on any difference it returns false before any side effect and the monitor
// takes its Python path (which builds a new plan). In Python the same checks and lists cost
// ~1.5 us per parameter (102 per record pass on a stack of 50 Linear layers).
//
// Python-aware glue, not a kernel: the kernels are reached through the dispatcher.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace healthmon {
namespace {

namespace py = pybind11;

class ParamPlan {
 public:
  // params: every watched parameter; grads: record p.grad instead of p; pindexes: the
  // parameters of the plan, in order; current: their tensors now (dtype and device kept);
  // groups: (buffer, positions into pindexes, slots) per buffer; sites / modules: the
  // order entry of each position (its site; the module whose forward stack it takes).
  ParamPlan(std::vector<at::Tensor> params, bool grads, std::vector<int64_t> pindexes,
            const std::vector<at::Tensor>& current, const py::list& groups, py::list sites,
            std::vector<int64_t> modules)
      : params_(std::move(params)), grads_(grads), pindexes_(std::move(pindexes)),
        sites_(std::move(sites)), modules_(std::move(modules)) {
    TORCH_CHECK(current.size() == pindexes_.size() && modules_.size() == pindexes_.size() &&
                    static_cast<size_t>(py::len(sites_)) == pindexes_.size(),
                "healthmon: ParamPlan: one tensor, site and module per parameter");
    for (size_t i = 0; i < pindexes_.size(); ++i) {
      TORCH_CHECK(pindexes_[i] >= 0 && static_cast<size_t>(pindexes_[i]) < params_.size(),
                  "healthmon: ParamPlan: parameter index ", pindexes_[i], " out of range");
      dtypes_.push_back(current[i].scalar_type());
      devices_.push_back(current[i].device());
    }
    for (const py::handle& g : groups) {
      auto t = g.cast<py::tuple>();
      groups_.push_back({t[0].cast<int64_t>(), t[1].cast<std::vector<int64_t>>(),
                         t[2].cast<std::vector<int64_t>>()});
    }
  }

  // Record the plan's tensors into records[buffer] (the buffers' tensors now: a buffer
  // that grew was reallocated); false (nothing done) when pindexes or a tensor differ.
  // sid None: each entry takes mod_stack[module] (its module's last forward stack).
  bool record(const std::vector<int64_t>& pindexes, std::vector<at::Tensor> records,
              py::list order, py::list mod_stack, const py::object& sid) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("healthmon::multi_stats_into", "")
                         .typed<void(at::TensorList, at::Tensor&, at::IntArrayRef)>();
    if (pindexes != pindexes_) return false;
    const size_t n = pindexes_.size();
    std::vector<at::Tensor> xs(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params_[pindexes_[i]];
      const at::Tensor& t = grads_ ? p.grad() : p;
      if (!t.defined() || t.scalar_type() != dtypes_[i] || t.device() != devices_[i] ||
          t.layout() != at::kStrided || t.key_set().has(c10::DispatchKey::Python))
        return false;  // no gradient this time, moved, a subclass: the Python path
      xs[i] = t;
    }
    for (const Group& g : groups_)
      if (g.buffer < 0 || g.buffer >= static_cast<int64_t>(records.size())) return false;
    if (sid.is_none()) {
      const int64_t stacks = static_cast<int64_t>(py::len(mod_stack));
      for (int64_t m : modules_)
        if (m < 0 || m >= stacks) return false;
    }
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<at::Tensor> group_xs;
      for (Group& g : groups_) {
        group_xs.clear();
        for (int64_t pos : g.positions) group_xs.push_back(xs[pos]);
        op.call(group_xs, records[g.buffer], g.slots);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      py::object stack = sid.is_none() ? py::object(mod_stack[modules_[i]]) : sid;
      order.append(py::make_tuple(sites_[i], stack));
    }
    return true;
  }

 private:
  struct Group {
    int64_t buffer;
    std::vector<int64_t> positions, slots;
  };
  std::vector<at::Tensor> params_;
  bool grads_;
  std::vector<int64_t> pindexes_;
  py::list sites_;
  std::vector<int64_t> modules_;
  std::vector<at::ScalarType> dtypes_;
  std::vector<at::Device> devices_;
  std::vector<Group> groups_;
};

}  // namespace

void register_param_plan(py::module& m) {
  py::class_<ParamPlan>(m, "ParamPlan",
                        "The monitor's parameter records of one phase (csrc/param_plan.cpp)")
      .def(py::init<std::vector<at::Tensor>, bool, std::vector<int64_t>,
                    const std::vector<at::Tensor>&, const py::list&, py::list,
                    std::vector<int64_t>>(),
           py::arg("params"), py::arg("grads"), py::arg("pindexes"), py::arg("current"),
           py::arg("groups"), py::arg("sites"), py::arg("modules"))
      .def("record", &ParamPlan::record, py::arg("pindexes"), py::arg("records"),
           py::arg("order"), py::arg("mod_stack"), py::arg("sid"));
}

}  // namespace healthmon
