// weighted_adv_loss_v2: the schemas and the C++ autograd of the second CUDA implementation of the fused
// loss (kernels: cuda/weighted_adv_loss_v2.cu), registered beside weighted_adv_loss so both can be
// compared on one build. Same pattern as weighted_adv_loss_autograd.cpp, which says why it is C++:
//
//   weighted_adv_loss_v2(seg, disc, aux?, label, threshold, floor, mu) -> loss () fp32
//   weighted_adv_loss_v2_fwd(...)                          -> (loss () fp32, dL/dz fp32 shaped like disc)
//   weighted_adv_loss_v2_bwd(grad_disc, grad_loss, dtype)  -> grad_disc * grad_loss rounded once to dtype
//
// Compiled in every build. The kernels exist for CUDA only: on CPU tensors, or in a build without the
// CUDA sources, the dispatcher raises its "could not run ... with arguments from the 'CPU' backend".
// Gradient flows into disc alone: the weights are constants (docs/METHOD.md §1). The backward is not
// itself differentiable (no double backward), like the saved dL/dz of weighted_adv_loss.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace pwda_fast {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> fused_fwd_v2(const at::Tensor& seg, const at::Tensor& disc,
                                                const std::optional<at::Tensor>& aux, double label,
                                                double threshold, double floor, double mu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pwda_fast::weighted_adv_loss_v2_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                 double, double, double)>();
  return op.call(seg, disc, aux, label, threshold, floor, mu);
}

at::Tensor fused_bwd_v2(const at::Tensor& grad_disc, const at::Tensor& grad_loss, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pwda_fast::weighted_adv_loss_v2_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  return op.call(grad_disc, grad_loss, dtype);
}

class WeightedAdvLossV2 : public torch::autograd::Function<WeightedAdvLossV2> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& seg, const at::Tensor& disc,
                            const std::optional<at::Tensor>& aux, double label, double threshold, double floor,
                            double mu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_disc] = fused_fwd_v2(seg, disc, aux, label, threshold, floor, mu);
    ctx->save_for_backward({grad_disc});
    ctx->saved_data["disc_dtype"] = static_cast<int64_t>(disc.scalar_type());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One kernel: fp32 dL/dz times the upstream gradient, read on the device (no host sync), rounded
    // once to D's dtype (rounding the kernel's dL/dz to bf16 first would be 2.1x the reference's bf16
    // error at grad_loss = 0.01: weighted_adv_loss_autograd.cpp).
    const at::Tensor grad_disc = ctx->get_saved_variables()[0];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["disc_dtype"].toInt());
    const at::Tensor grad = fused_bwd_v2(grad_disc, grad_outputs[0], dtype);
    return {at::Tensor(), grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor weighted_adv_loss_v2_autograd(const at::Tensor& seg, const at::Tensor& disc,
                                         const std::optional<at::Tensor>& aux, double label, double threshold,
                                         double floor, double mu) {
  return WeightedAdvLossV2::apply(seg, disc, aux, label, threshold, floor, mu);
}

// Below autograd (inference mode, or after the autograd kernel redispatched).
at::Tensor weighted_adv_loss_v2_plain(const at::Tensor& seg, const at::Tensor& disc,
                                      const std::optional<at::Tensor>& aux, double label, double threshold,
                                      double floor, double mu) {
  return std::get<0>(fused_fwd_v2(seg, disc, aux, label, threshold, floor, mu));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pwda_fast, m) {
  m.def("weighted_adv_loss_v2_fwd(Tensor seg_logits, Tensor disc_logits, Tensor? aux_logits, float label, "
        "float threshold, float floor, float mu) -> (Tensor loss, Tensor grad_disc)");
  m.def("weighted_adv_loss_v2_bwd(Tensor grad_disc, Tensor grad_loss, ScalarType dtype) -> Tensor");
  m.def("weighted_adv_loss_v2(Tensor seg_logits, Tensor disc_logits, Tensor? aux_logits, float label, "
        "float threshold, float floor, float mu) -> Tensor");
}

TORCH_LIBRARY_IMPL(pwda_fast, Autograd, m) {
  m.impl("weighted_adv_loss_v2", &weighted_adv_loss_v2_autograd);
}

// CUDA only: there is no CPU kernel below it. In a build without the CUDA sources this registration is
// inert and weighted_adv_loss_v2_fwd raises "no CUDA kernel".
TORCH_LIBRARY_IMPL(pwda_fast, CUDA, m) {
  m.impl("weighted_adv_loss_v2", &weighted_adv_loss_v2_plain);
}

}  // namespace pwda_fast
