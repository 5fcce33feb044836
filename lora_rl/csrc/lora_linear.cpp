// C++ bodies of the lora_rl::lora_linear operators (schemas and the Python bodies: fused_lora.py).
//
// Why C++: a compiled decoder layer calls these operators from inductor's C++ wrapper through the
// dispatcher. With the Python bodies every call went back into the interpreter for about eight ATen
// calls, and at 1.5B the step waited on that host time: 392 calls per step, 10-20 ms. Here the same
// GEMMs, with the same arguments and in the same order, are issued from C++, so results are
// bit-identical to the Python bodies.
//
// Registered for one dispatch key (CUDA unless LORA_RL_DISPATCH_KEY says otherwise: the CPU test
// builds it for CPU), where it takes precedence over the Python CompositeExplicitAutograd bodies.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#ifndef LORA_RL_DISPATCH_KEY
#define LORA_RL_DISPATCH_KEY CUDA
#endif

namespace {

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                               const at::Tensor& lora_b, double scaling) {
  at::Tensor xa = at::mm(x, lora_a.t());  // [N, r]
  // The scaling rides on the GEMM's alpha; beta=0 ignores the (uninitialised) first argument.
  at::Tensor out = bias.has_value() ? at::addmm(*bias, xa, lora_b.t(), 1, scaling)
                                    : at::addmm(at::empty({}, x.options()), xa, lora_b.t(), 0, scaling);
  out.addmm_(x, weight.t());  // the frozen base GEMM accumulates onto the low-rank term in its epilogue
  return {out, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scaling, bool need_input) {
  at::Tensor none = at::empty({}, x.options());
  at::Tensor gb = at::mm(grad, lora_b);  // [N, r]
  at::Tensor grad_a = at::addmm(none, gb.t(), x, 0, scaling);  // [r, in]
  at::Tensor grad_b = at::addmm(none, grad.t(), xa, 0, scaling);  // [out, r]
  if (!need_input) {
    return {at::empty({0}, x.options()), grad_a, grad_b};
  }
  at::Tensor grad_x = at::addmm(none, gb, lora_a, 0, scaling);  // the low-rank term first,
  grad_x.addmm_(grad, weight);  // then the frozen base's input gradient accumulated onto it
  return {grad_x, grad_a, grad_b};
}

// The MLP's operators (lora_rl/fused_mlp.py): down's forward from its rank-r product, down's backward
// without its A gradient and low-rank input gradient, and gate's and up's without their B gradients, which the Triton kernels
// between them form.
at::Tensor lora_mlp_down_forward(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& xa, const at::Tensor& lora_b, double scaling) {
  at::Tensor out = bias.has_value() ? at::addmm(*bias, xa, lora_b.t(), 1, scaling)
                                    : at::addmm(at::empty({}, h.options()), xa, lora_b.t(), 0, scaling);
  out.addmm_(h, weight.t());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_mlp_down_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& lora_b, const at::Tensor& xa,
    double scaling) {
  at::Tensor none = at::empty({}, grad.options());
  at::Tensor gb = at::mm(grad, lora_b);  // [N, r], unscaled
  at::Tensor grad_b = at::addmm(none, grad.t(), xa, 0, scaling);
  // h's gradient without the low-rank term scaling * gb A: the backward kernel adds that to its tiles
  return {at::mm(grad, weight), gb, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_mlp_gate_up_backward(
    const at::Tensor& grad_g, const at::Tensor& grad_u, const at::Tensor& x, const at::Tensor& weight_g,
    const at::Tensor& a_g, const at::Tensor& b_g, const at::Tensor& weight_u, const at::Tensor& a_u,
    const at::Tensor& b_u, double scaling_g, double scaling_u, bool need_input) {
  at::Tensor none = at::empty({}, x.options());
  at::Tensor gb_g = at::mm(grad_g, b_g);
  at::Tensor gb_u = at::mm(grad_u, b_u);
  at::Tensor grad_a_g = at::addmm(none, gb_g.t(), x, 0, scaling_g);
  at::Tensor grad_a_u = at::addmm(none, gb_u.t(), x, 0, scaling_u);
  if (!need_input) {
    return {at::empty({0}, x.options()), grad_a_g, grad_a_u};
  }
  at::Tensor grad_x = at::addmm(none, gb_g, a_g, 0, scaling_g);
  grad_x.addmm_(gb_u, a_u, 1, scaling_u);
  grad_x.addmm_(grad_g, weight_g);
  grad_x.addmm_(grad_u, weight_u);
  return {grad_x, grad_a_g, grad_a_u};
}

// An attention's q, k and v projections as one LoRA linear (lora_rl/fused_qkv.py): the frozen weights and
// the As concatenated per call, the Bs as one block-diagonal matrix with the scalings on it, and in the
// backward the three outputs' gradients concatenated for one input-gradient GEMM.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_concatenated(
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v, const at::Tensor& a_q, const at::Tensor& b_q,
    const at::Tensor& a_k, const at::Tensor& b_k, const at::Tensor& a_v, const at::Tensor& b_v, double s_q, double s_k,
    double s_v) {
  return {at::cat({w_q, w_k, w_v}), at::cat({a_q, a_k, a_v}), at::block_diag({b_q * s_q, b_k * s_k, b_v * s_v})};
}

std::tuple<at::Tensor, at::Tensor> lora_qkv(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
                                            const at::Tensor& w_v, const std::optional<at::Tensor>& bias,
                                            const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_k,
                                            const at::Tensor& b_k, const at::Tensor& a_v, const at::Tensor& b_v,
                                            double s_q, double s_k, double s_v) {
  auto [weight, lora_a, lora_b] = qkv_concatenated(w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v);
  return lora_linear(x, weight, bias, lora_a, lora_b, 1.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_qkv_backward(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& x,
    const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v, const at::Tensor& a_q, const at::Tensor& b_q,
    const at::Tensor& a_k, const at::Tensor& b_k, const at::Tensor& a_v, const at::Tensor& b_v, const at::Tensor& xa,
    double s_q, double s_k, double s_v, bool need_input) {
  auto [weight, lora_a, lora_b] = qkv_concatenated(w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v);
  return lora_linear_backward(at::cat({grad_q, grad_k, grad_v}, 1), x, weight, lora_a, lora_b, xa, 1.0, need_input);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_rl, LORA_RL_DISPATCH_KEY, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("lora_mlp_down_forward", &lora_mlp_down_forward);
  m.impl("lora_mlp_down_backward", &lora_mlp_down_backward);
  m.impl("lora_mlp_gate_up_backward", &lora_mlp_gate_up_backward);
  m.impl("lora_qkv", &lora_qkv);
  m.impl("lora_qkv_backward", &lora_qkv_backward);
}
