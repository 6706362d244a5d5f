// Parameter-gradient hooks in C++ (healthmon._C.ParamGradHooks): one post-accumulate-grad
// hook per watched parameter without a Python call per parameter per backward.
//
// The Python way (Tensor.register_post_accumulate_grad_hook) costs a GIL round trip, a tuple
// and a Python frame per parameter per backward (~1-2 us each; 102 per step on a stack of 50
// Linear layers). In async mode all the monitor does there is note "parameter i has a new
// gradient" and queue one engine callback that records the noted gradients when the backward
// ends; this file does exactly that in C++ and calls Python once per backward.
//
// A tensor has one post-accumulate-grad slot (autograd meta), which torch's Python hooks
// occupy with a dict-backed hook. Ours wraps whatever is there (the user's Python hooks keep
// running, after ours) and, for compiled autograd, hands compiled autograd the monitor's
// Python hook object to trace (compiled_args), so a compiled backward records the gradients
// as before. In sync mode, with torch.distributed or on a step the cadence skips, the hook
// calls that Python object (the monitor's full judgement). verify() re-wraps a slot that was
// replaced (an assignment to `p._post_accumulate_grad_hooks`); remove() restores each slot.
//
// Python-aware glue (torch's Python headers): not part of the torch-free kernels.
#include <torch/extension.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/PyInterpreter.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace py = pybind11;
using torch::autograd::PostAccumulateGradHook;
using torch::autograd::Variable;

namespace healthmon {
namespace {

struct ParamState {
  std::mutex mu;
  bool alive = true;   // the monitor is not removed
  bool queue = false;  // this step: note gradients, record them once when the backward ends
  std::vector<int64_t> pending;  // parameters with a new gradient in this backward
  std::vector<char> noted;       // [parameter index]: in `pending` (each once)
  int64_t queued_task = -1;      // graph task whose end-of-backward callback is queued
  py::object flush;    // Python: (list of parameter indexes) -> None

  // The last owner may be a hook or a callback running without the GIL.
  ~ParamState() {
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      flush = py::object();
    } else {
      flush.release();  // the interpreter is gone: leak the reference
    }
  }
};

// Runs the end-of-backward callback: hands the noted parameters to Python.
void flush_pending(const std::weak_ptr<ParamState>& weak) {
  auto st = weak.lock();
  if (!st) return;
  std::vector<int64_t> pending;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    pending.swap(st->pending);
    for (int64_t i : pending) st->noted[i] = 0;
    st->queued_task = -1;
  }
  if (pending.empty() || !st->alive) return;
  py::gil_scoped_acquire gil;
  try {
    st->flush(py::cast(pending));
  } catch (py::error_already_set& e) {
    e.restore();
    throw python_error();
  }
}

class ParamGradHook : public PostAccumulateGradHook {
 public:
  ParamGradHook(std::weak_ptr<ParamState> state, int64_t index, py::object py_hook_ref,
                std::unique_ptr<PostAccumulateGradHook> inner)
      : state_(std::move(state)),
        index_(index),
        py_hook_ref_(std::move(py_hook_ref)),
        inner_(std::move(inner)) {}

  ~ParamGradHook() override {
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      py_hook_ref_ = py::object();
    } else {
      py_hook_ref_.release();  // the interpreter is gone: leak the reference
    }
  }

  void operator()(const Variable& param) override {
    if (auto st = state_.lock()) {
      if (st->alive) {
        bool call_python = true;
        {
          std::lock_guard<std::mutex> lock(st->mu);
          if (st->queue) {
            call_python = false;
            if (!st->noted[index_]) {  // (a nested backward may see a parameter again)
              st->noted[index_] = 1;
              st->pending.push_back(index_);
            }
            const int64_t task = torch::autograd::get_current_graph_task_id();
            if (st->queued_task != task) {  // a failed backward never ran its callback
              st->queued_task = task;
              std::weak_ptr<ParamState> weak = state_;
              torch::autograd::Engine::get_default_engine().queue_callback(
                  [weak]() { flush_pending(weak); });
            }
          }
        }
        if (call_python) {  // the monitor's Python hook: sync, distributed, skipped step
          py::gil_scoped_acquire gil;
          py::object hook = py_hook();
          if (hook) {
            try {
              hook(py::reinterpret_steal<py::object>(THPVariable_Wrap(param)));
            } catch (py::error_already_set& e) {
              e.restore();
              throw python_error();
            }
          }
        }
      }
    }
    if (inner_) (*inner_)(param);
  }

  // Compiled autograd: the user's hooks (inner) and the monitor's Python hook are traced.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    if (inner_) inner_->compiled_args(args);
    auto st = state_.lock();
    if (!st || !st->alive) return;
    py::gil_scoped_acquire gil;
    py::object hook = py_hook();
    if (hook) {
      args.add_post_acc_grad_hook(
          c10::SafePyObject(hook.release().ptr(), getPyInterpreter()));
    }
  }

  void apply_with_saved(Variable& tensor,
                        torch::dynamo::autograd::SwapSavedVariables& saved) override {
    if (inner_) {  // torch's dict hook calls every hook id of the node (ours included)
      inner_->apply_with_saved(tensor, saved);
      return;
    }
    for (const auto hook_id : saved.get_curr_node_call().post_acc_grad_hooks) {
      py::object var = py::reinterpret_steal<py::object>(THPVariable_Wrap(tensor));
      py::object res = py::reinterpret_steal<py::object>(PyObject_CallMethod(
          saved.get_py_compiler(), "post_acc_grad_hook", "Oi", var.ptr(), hook_id));
      if (!res) throw python_error();
    }
  }

  std::unique_ptr<PostAccumulateGradHook> take_inner() { return std::move(inner_); }

 private:
  py::object py_hook() const {  // the monitor's Python hook object, or None when freed
    py::object hook = py::reinterpret_borrow<py::object>(PyWeakref_GetObject(py_hook_ref_.ptr()));
    return hook.is_none() ? py::object() : hook;
  }

  std::weak_ptr<ParamState> state_;
  int64_t index_;
  py::object py_hook_ref_;  // weakref to the Python hook: the C++ slot is invisible to the GC
  std::unique_ptr<PostAccumulateGradHook> inner_;
};

class ParamGradHooks {
 public:
  explicit ParamGradHooks(py::object flush) : state_(std::make_shared<ParamState>()) {
    state_->flush = std::move(flush);
  }

  ~ParamGradHooks() { remove(); }

  // Hooks parameter `index` (a leaf requiring grad); `py_hook` is the monitor's Python hook
  // object (held weakly: the monitor keeps it).
  void install(const at::Tensor& param, int64_t index, py::object py_hook) {
    TORCH_CHECK(param.requires_grad() && param.is_leaf(),
                "healthmon: ParamGradHooks.install needs a leaf tensor that requires grad");
    py::object ref = py::reinterpret_steal<py::object>(PyWeakref_NewRef(py_hook.ptr(), nullptr));
    if (!ref) throw py::error_already_set();
    TORCH_CHECK(index >= 0, "healthmon: ParamGradHooks.install needs an index >= 0");
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (static_cast<size_t>(index) >= state_->noted.size()) state_->noted.resize(index + 1, 0);
    }
    entries_.push_back({param, index, std::move(ref), nullptr});
    wrap(entries_.back());
  }

  // Re-wraps the slots that were replaced since (an assignment to
  // `p._post_accumulate_grad_hooks` installs a new dict hook over ours).
  int verify() {
    int rewrapped = 0;
    for (auto& e : entries_) {
      if (torch::autograd::impl::post_acc_grad_hooks(e.param).get() != e.hook) {
        wrap(e);
        ++rewrapped;
      }
    }
    return rewrapped;
  }

  // Whether this step's gradients are noted in C++ (true) or handed to the Python hook.
  void set_queue(bool queue) {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->queue = queue && state_->alive;
  }

  // The noted parameters whose callback has not run (a backward that failed): cleared.
  std::vector<int64_t> take_pending() {
    std::lock_guard<std::mutex> lock(state_->mu);
    std::vector<int64_t> out;
    out.swap(state_->pending);
    for (int64_t i : out) state_->noted[i] = 0;
    state_->queued_task = -1;
    return out;
  }

  // Restores every slot to what it held before (the user's hooks stay).
  void remove() {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->alive = false;
      state_->queue = false;
      for (int64_t i : state_->pending) state_->noted[i] = 0;
      state_->pending.clear();
    }
    for (auto& e : entries_) {
      auto& slot = torch::autograd::impl::post_acc_grad_hooks(e.param);
      if (slot.get() == e.hook) {
        auto inner = static_cast<ParamGradHook*>(slot.get())->take_inner();
        slot = std::move(inner);
      }
    }
    entries_.clear();
  }

 private:
  struct Entry {
    at::Tensor param;
    int64_t index;
    py::object py_hook_ref;
    PostAccumulateGradHook* hook;  // ours, while it is in the slot
  };

  void wrap(Entry& e) {
    auto& slot = torch::autograd::impl::post_acc_grad_hooks(e.param);
    auto hook = std::make_unique<ParamGradHook>(state_, e.index, e.py_hook_ref, std::move(slot));
    e.hook = hook.get();
    slot = std::move(hook);
  }

  std::shared_ptr<ParamState> state_;
  std::vector<Entry> entries_;
};

}  // namespace

void register_param_hooks(py::module& m) {
  py::class_<ParamGradHooks>(m, "ParamGradHooks",
                             "Parameter-gradient hooks in C++ (see csrc/param_hooks.cpp)")
      .def(py::init<py::object>(), py::arg("flush"))
      .def("install", &ParamGradHooks::install, py::arg("param"), py::arg("index"),
           py::arg("py_hook"))
      .def("verify", &ParamGradHooks::verify)
      .def("set_queue", &ParamGradHooks::set_queue)
      .def("take_pending", &ParamGradHooks::take_pending)
      .def("remove", &ParamGradHooks::remove);
}

}  // namespace healthmon
