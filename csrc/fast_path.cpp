// The monitor's eager hot path in C++ (healthmon._C.FastPath): the common case of a watched
// module's forward hook (a call of the step returned one plain tensor, or a flat tuple of
// plain tensors and Nones, from the same two user frames as last time) and the gradients of
// those outputs, without Python bytecode.
//
// It does exactly what healthmon/monitor.py's Monitor._forward_tensor / _on_forward /
// _on_grad do for that case, on the monitor's own Python objects (the step's order list, call counts, the
// seen-tensor dict, the Step), so the Python slow path and this one interleave freely. Any
// other case (first call of a site, another dtype or device, a tensor subclass or functorch
// wrapper, a stack that changed, recomputation in backward, sync mode off the CPU, compiled
// code) returns false before any side effect and the Python path handles it. In sync mode (CPU
// records) each record's NaN / Inf counts are read here and only a bad one goes to Python
// (Monitor._check_now, which reports and may raise).
//
// Python-aware glue (torch's Python headers): not part of the torch-free kernels.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <frameobject.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/Exceptions.h>

#include "record.h"

#include <memory>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace healthmon {
namespace {

// One output of a call: its site and its gradient's site.
struct OutCache {
  bool forward_ready = false;
  py::object buffer;       // records.DeviceBuffer (its .records may be replaced on growth)
  int64_t slot = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device{c10::kCPU};
  py::object order_entry;  // the (site, stack id) tuple the step's order gets

  bool backward_ready = false;
  py::object bwd_site;
  py::object bwd_buffer;
  int64_t bwd_slot = 0;
  c10::ScalarType bwd_dtype = c10::ScalarType::Float;
  c10::Device bwd_device{c10::kCPU};
};

// One call (0, 1, ... in the step) of a watched module: its outputs (one tensor, or a flat
// tuple of tensors and Nones) and the stack it was called from.
struct CallCache {
  int64_t nparts = 0;         // 0: the output is one tensor; n: a tuple of n items
  std::vector<OutCache> outs;  // [item] (one for a single tensor)
  bool stack_ready = false;  // sid and frames below were primed by a forward
  int64_t sid = -1;
  py::object sid_obj;      // the same id as a Python int (the module's stack id)
  int user_start = 0;      // frames between the hook's caller and the first user frame
  std::vector<std::pair<PyObject*, int>> frames;  // (code, line) of the re-checked frames
  py::list codes;          // keeps those code objects alive

  OutCache* out(int64_t part) {
    return part >= 0 && static_cast<size_t>(part) < outs.size() ? &outs[part] : nullptr;
  }
};

struct State {
  bool alive = true;     // the monitor is not removed
  bool enabled = false;  // this step takes the fast path (active; not sync with compiled code)
  py::object marker;     // str, or None: the attribute compiled code marks its records with
  bool sync = false;     // sync mode: every record checked as it is written
  std::vector<std::vector<CallCache>> modules;  // [module index][call in the step]
  py::object order;      // list: the step's (site, stack id) records in execution order
  py::object calls;      // list of int: calls of each module in the step
  py::object seen;       // dict: id(tensor) -> (weakref, recorded forward, hooked backward)
  py::object step;       // records.Step (its .backward is set by a gradient)
  py::object grad_fallback;  // Python: (index, call, part, sid, grad), the slow gradient path
  py::object check_now;  // Python: (site, sid), sync mode's judgement of a bad record
  py::object mod_stack;  // list of int: each module's last stack id (parameter records)
};

bool plain_dense(const at::Tensor& t) {
  // subclasses (Python key), functorch wrappers and functional tensors go the Python way
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Functionalize});
  return t.layout() == c10::kStrided && !t.is_nested() &&
         !t.unsafeGetTensorImpl()->key_set().has_any(wrapped);
}

// Records `x` into row `slot` of `buffer`; returns the records tensor written.
at::Tensor record_into(const at::Tensor& x, const py::object& buffer, int64_t slot) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("healthmon::stats_into", "")
                       .typed<void(const at::Tensor&, at::Tensor&, int64_t)>();
  static PyObject* records_attr = PyUnicode_InternFromString("records");  // never freed
  py::object records_obj = py::reinterpret_steal<py::object>(
      PyObject_GetAttr(buffer.ptr(), records_attr));
  if (!records_obj) throw py::error_already_set();
  at::Tensor records = THPVariable_Unpack(records_obj.ptr());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(x, records, slot);
  return records;
}

// Sync mode: whether row `slot` (CPU, float64) counts any NaN or +-Inf. The full judgement
// (allowed Inf, additive masks) is Python's, for the rows this flags.
bool row_flagged(const at::Tensor& records, int64_t slot) {
  const double* row = records.data_ptr<double>() + slot * kNumStatsFields;
  return row[kNan] != 0.0 || row[kPosInf] != 0.0 || row[kNegInf] != 0.0;
}

// A Python call from inside C++ (a forward hook or an autograd hook): its exception (a
// HealthError in sync mode) goes back to Python as itself.
template <typename... Args>
void call_python(const py::object& fn, Args&&... args) {
  try {
    fn(std::forward<Args>(args)...);
  } catch (py::error_already_set& e) {
    e.restore();
    throw python_error();
  }
}

// The gradient of a fast-path output: recorded by this node pre-hook (no Python object,
// no RemovableHandle). Holds the monitor's state weakly: a graph outliving the monitor
// records nothing.
class GradRecord : public torch::autograd::FunctionPreHook {
 public:
  // part: the output's item in a tuple output, -1 for a single-tensor output
  GradRecord(std::weak_ptr<State> state, int64_t index, int64_t call, int64_t part,
             int64_t sid, uint32_t output_nr)
      : state_(std::move(state)), index_(index), call_(call), part_(part), sid_(sid),
        output_nr_(output_nr) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grads) override {
    if (output_nr_ >= grads.size() || !grads[output_nr_].defined()) return grads;
    const at::Tensor& g = grads[output_nr_];
    py::gil_scoped_acquire gil;
    auto st = state_.lock();
    if (!st || !st->alive) return grads;
    OutCache* o = st->modules[index_][call_].out(part_ < 0 ? 0 : part_);
    if (o == nullptr || !o->backward_ready || !plain_dense(g) || g.scalar_type() != o->bwd_dtype ||
        g.device() != o->bwd_device || (st->sync && !o->bwd_device.is_cpu())) {
      call_python(st->grad_fallback, index_, call_, part_, sid_,
                  py::reinterpret_steal<py::object>(THPVariable_Wrap(g)));
      return grads;
    }
    OutCache& c = *o;
    static PyObject* backward_attr = PyUnicode_InternFromString("backward");  // never freed
    if (PyObject_SetAttr(st->step.ptr(), backward_attr, Py_True) < 0) throw python_error();
    at::Tensor records = record_into(g, c.bwd_buffer, c.bwd_slot);
    py::tuple entry = py::make_tuple(c.bwd_site, sid_);
    if (PyList_Append(st->order.ptr(), entry.ptr()) < 0) throw python_error();
    if (st->sync) {
      if (row_flagged(records, c.bwd_slot)) {
        call_python(st->check_now, c.bwd_site, sid_);
      } else {  // what Python's check does with a healthy gradient: the consumer to blame
        static PyObject* prev_attr = PyUnicode_InternFromString("prev_bwd");  // never freed
        if (PyObject_SetAttr(st->step.ptr(), prev_attr, entry.ptr()) < 0) throw python_error();
      }
    }
    return grads;
  }

 private:
  std::weak_ptr<State> state_;
  int64_t index_;
  int64_t call_;
  int64_t part_;
  int64_t sid_;
  uint32_t output_nr_;
};

// Whether the caller's stack still matches the module's cached one on the re-checked user
// frames. The current frame is the Python hook that called us; its caller is frame 0 of
// the cached stack.
bool same_stack(const CallCache& c) {
  PyFrameObject* f = PyEval_GetFrame();  // borrowed
  if (f == nullptr) return false;
  Py_INCREF(f);
  for (int i = 0; i <= c.user_start && f != nullptr; ++i) {
    PyFrameObject* back = PyFrame_GetBack(f);
    Py_DECREF(f);
    f = back;
  }
  bool same = true;
  for (const auto& [code, line] : c.frames) {
    if (f == nullptr) {
      same = false;
      break;
    }
    PyCodeObject* fc = PyFrame_GetCode(f);
    same = reinterpret_cast<PyObject*>(fc) == code && PyFrame_GetLineNumber(f) == line;
    Py_DECREF(fc);
    if (!same) break;
    PyFrameObject* back = PyFrame_GetBack(f);
    Py_DECREF(f);
    f = back;
  }
  Py_XDECREF(f);
  return same;
}

class FastPath {
 public:
  FastPath(size_t modules, py::object grad_fallback, py::object mod_stack, bool sync,
           py::object check_now)
      : state_(std::make_shared<State>()) {
    state_->modules.resize(modules);
    state_->grad_fallback = std::move(grad_fallback);
    state_->mod_stack = std::move(mod_stack);
    state_->sync = sync;
    state_->check_now = std::move(check_now);
  }

  // A new step (or segment): the monitor's per-step objects, and whether to take the path.
  void begin_step(py::object order, py::object calls, py::object seen, py::object step,
                  bool enabled) {
    State& st = *state_;
    st.order = std::move(order);
    st.calls = std::move(calls);
    st.seen = std::move(seen);
    st.step = std::move(step);
    st.enabled = enabled && st.alive;
  }

  void set_enabled(bool enabled) { state_->enabled = enabled && state_->alive; }

  // Compiled code records too (healthmon.traced): an output carrying `name` was recorded,
  // and its gradient hooked, by the compiled module that produced it.
  void set_marker(py::object name) { state_->marker = std::move(name); }

  // The monitor is removed: gradients of graphs still alive record nothing.
  void disable() {
    state_->alive = false;
    state_->enabled = false;
  }

  // Item `part` of call `call`'s output (nparts 0: a single tensor, part 0; n: a tuple of
  // n items) was recorded at `site` from stack `sid`.
  void prime_forward(int64_t index, int64_t call, int64_t part, int64_t nparts,
                     py::object site, py::object buffer, int64_t slot, py::object dtype,
                     py::object device, int64_t sid, int user_start, py::list frames) {
    TORCH_CHECK(nparts >= 0 && part >= 0 && part < std::max<int64_t>(nparts, 1),
                "healthmon: prime_forward part out of range");
    CallCache& c = cache(index, call);
    const size_t items = static_cast<size_t>(std::max<int64_t>(nparts, 1));
    if (c.nparts != nparts) {  // another kind of output than before: start over
      c.nparts = nparts;
      c.outs.assign(items, OutCache());
    } else if (c.outs.size() < items) {  // (only a gradient primed so far)
      c.outs.resize(items);
    }
    OutCache& o = c.outs[part];
    o.buffer = std::move(buffer);
    o.slot = slot;
    o.dtype = torch::python::detail::py_object_to_dtype(dtype);
    o.device = torch::python::detail::py_object_to_device(device);
    o.order_entry = py::make_tuple(site, sid);
    if (c.sid != sid) {  // the other items' entries name the old stack
      for (auto& other : c.outs) other.forward_ready = false;
    }
    c.sid = sid;
    c.sid_obj = py::int_(sid);
    c.user_start = user_start;
    c.frames.clear();
    c.codes = py::list();
    for (auto item : frames) {
      auto pair = item.cast<py::tuple>();
      c.codes.append(pair[0]);
      c.frames.emplace_back(pair[0].ptr(), pair[1].cast<int>());
    }
    o.forward_ready = true;
    c.stack_ready = true;
  }

  // The gradient site of item `part` of call `call`'s output.
  void prime_backward(int64_t index, int64_t call, int64_t part, py::object site,
                      py::object buffer, int64_t slot, py::object dtype, py::object device) {
    TORCH_CHECK(part >= 0, "healthmon: prime_backward part out of range");
    CallCache& call_cache = cache(index, call);
    if (static_cast<size_t>(part) >= call_cache.outs.size()) call_cache.outs.resize(part + 1);
    OutCache& c = call_cache.outs[part];
    c.bwd_site = std::move(site);
    c.bwd_buffer = std::move(buffer);
    c.bwd_slot = slot;
    c.bwd_dtype = torch::python::detail::py_object_to_dtype(dtype);
    c.bwd_device = torch::python::detail::py_object_to_device(device);
    c.backward_ready = true;
  }

  // The forward hook of module `index` returned `output`: true when handled here.
  bool forward(int64_t index, py::handle output) {
    State& st = *state_;
    if (!st.enabled || index < 0 || static_cast<size_t>(index) >= st.modules.size())
      return false;
    PyObject* out = output.ptr();
    const bool single = THPVariable_CheckExact(out);
    if (!single && !PyTuple_CheckExact(out)) return false;
    PyObject* calls = st.calls.ptr();
    if (index >= PyList_GET_SIZE(calls) || index >= PyList_GET_SIZE(st.mod_stack.ptr()))
      return false;
    const long call = PyLong_AsLong(PyList_GET_ITEM(calls, index));
    auto& module_calls = st.modules[index];
    if (call < 0 || static_cast<size_t>(call) >= module_calls.size()) return false;
    CallCache& c = module_calls[call];
    if (!c.stack_ready) return false;
    const Py_ssize_t n = single ? 1 : PyTuple_GET_SIZE(out);
    if (c.nparts != (single ? 0 : n) || n < 1 || static_cast<size_t>(n) > c.outs.size())
      return false;
    if (torch::autograd::get_current_graph_task_id() >= 0)
      return false;  // recomputation (activation checkpointing) inside backward
    const bool grad_mode = c10::GradMode::is_enabled();

    // First every item is checked (anything unusual: the Python path, before any side
    // effect), then recorded. An item an inner module returned is recorded there.
    enum Plan : char { kSkip, kRecord };
    constexpr Py_ssize_t kMaxItems = 16;
    if (n > kMaxItems) return false;
    Plan plan[kMaxItems];
    py::object keys[kMaxItems];
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = single ? out : PyTuple_GET_ITEM(out, i);
      plan[i] = kSkip;
      if (item == Py_None) continue;
      if (!THPVariable_CheckExact(item)) return false;
      if (st.marker && !st.marker.is_none() && PyObject_HasAttr(item, st.marker.ptr()))
        continue;  // recorded by compiled code
      for (Py_ssize_t j = 0; j < i; ++j) {
        if (PyTuple_GET_ITEM(out, j) == item) return false;  // the same tensor twice
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      if (!plain_dense(t)) return false;
      const bool want_bwd = t.grad_fn() != nullptr && grad_mode;
      keys[i] = py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(item));
      PyObject* entry = PyDict_GetItem(st.seen.ptr(), keys[i].ptr());  // borrowed
      if (entry != nullptr && PyWeakref_GetObject(PyTuple_GET_ITEM(entry, 0)) == item) {
        // recorded by an inner module: done, unless its gradient still needs a hook
        if (!(PyObject_IsTrue(PyTuple_GET_ITEM(entry, 2)) || !want_bwd)) return false;
        continue;
      }
      const OutCache& o = c.outs[i];
      if (!o.forward_ready || t.scalar_type() != o.dtype || t.device() != o.device) return false;
      if (st.sync && !o.device.is_cpu()) return false;  // reading the row would sync
      if (want_bwd && !o.backward_ready) return false;  // the gradient site is not known yet
      plan[i] = kRecord;
    }
    if (!same_stack(c)) return false;

    set_called(index, call, c);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (plan[i] != kRecord) continue;
      PyObject* item = single ? out : PyTuple_GET_ITEM(out, i);
      const at::Tensor& t = THPVariable_Unpack(item);
      const OutCache& o = c.outs[i];
      const bool want_bwd = t.grad_fn() != nullptr && grad_mode;
      at::Tensor records = record_into(t, o.buffer, o.slot);
      if (PyList_Append(st.order.ptr(), o.order_entry.ptr()) < 0) throw py::error_already_set();
      if (st.sync && row_flagged(records, o.slot)) {  // Python judges, reports, may raise
        py::tuple entry = py::reinterpret_borrow<py::tuple>(o.order_entry);
        st.check_now(entry[0], entry[1]);
      }
      if (want_bwd) {
        t.grad_fn()->add_pre_hook(std::make_unique<GradRecord>(
            state_, index, call, single ? -1 : i, c.sid, t.output_nr()));
      }
      py::object ref = py::reinterpret_steal<py::object>(PyWeakref_NewRef(item, nullptr));
      if (!ref) throw py::error_already_set();
      py::tuple value = py::make_tuple(ref, true, want_bwd);
      if (PyDict_SetItem(st.seen.ptr(), keys[i].ptr(), value.ptr()) < 0)
        throw py::error_already_set();
    }
    return true;
  }

 private:
  CallCache& cache(int64_t index, int64_t call) {
    TORCH_CHECK(index >= 0 && call >= 0, "healthmon: module index and call must be >= 0");
    auto& modules = state_->modules;
    if (static_cast<size_t>(index) >= modules.size()) modules.resize(index + 1);
    if (static_cast<size_t>(call) >= modules[index].size()) modules[index].resize(call + 1);
    return modules[index][call];
  }

  // What the Python path does on a module's call: one call counted, its stack id kept.
  void set_called(int64_t index, long call, const CallCache& c) {
    PyList_SetItem(state_->calls.ptr(), index, PyLong_FromLong(call + 1));  // steals
    PyObject* sid = c.sid_obj.ptr();
    Py_INCREF(sid);
    PyList_SetItem(state_->mod_stack.ptr(), index, sid);
  }

  std::shared_ptr<State> state_;
};

}  // namespace

void register_fast_path(py::module& m) {
  py::class_<FastPath>(m, "FastPath",
                       "The monitor's eager hot path (see csrc/fast_path.cpp)")
      .def(py::init<size_t, py::object, py::object, bool, py::object>(), py::arg("modules"),
           py::arg("grad_fallback"), py::arg("mod_stack"), py::arg("sync"),
           py::arg("check_now"))
      .def("begin_step", &FastPath::begin_step)
      .def("set_enabled", &FastPath::set_enabled)
      .def("set_marker", &FastPath::set_marker)
      .def("disable", &FastPath::disable)
      .def("prime_forward", &FastPath::prime_forward)
      .def("prime_backward", &FastPath::prime_backward)
      .def("forward", &FastPath::forward);
}

}  // namespace healthmon
