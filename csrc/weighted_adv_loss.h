// Declarations shared by the CPU (weighted_adv_loss.cpp) and CUDA (cuda/weighted_adv_loss.cu) kernels.
#pragma once

#include <torch/all.h>

namespace pwda_fast {

// TORCH_CHECKs the op's inputs (shape, dtype, device, label); the messages name the tensor and the rule.
void check_weighted_adv_loss_inputs(const at::Tensor& seg, const at::Tensor& disc,
                                    const c10::optional<at::Tensor>& aux, double label);

}  // namespace pwda_fast
