// SPDX-License-Identifier: MIT
// Binding of the MoE feed-forward block (mixers/moe.hpp) with transformers' weight layout:
// router gate.weight [E, D], experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I],
// optional shared expert and its sigmoid gate, e_score_correction_bias. float32 weights and
// activations; the experts are packed once at construction (pack_experts=True, a copy) or used
// in place (pack_experts=False); the object keeps the arrays alive either way.
#include <string>

#include <seqmix/mixers/moe.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;
namespace km = kernels::moe;

class moe_object {
 public:
  moe_object(py::object router, py::object gate_up_proj, py::object down_proj, index_t top_k,
             const std::string& router_kind, bool norm_topk_prob, index_t n_group,
             index_t topk_group, float routed_scaling_factor, py::object bias,
             py::object shared_gate_proj, py::object shared_up_proj, py::object shared_down_proj,
             py::object shared_expert_gate, const std::string& activation, bool gated,
             float capacity_factor, const std::string& drop, bool compute_losses, bool pack_experts)
      : c_("seqmix.MoE", false) {
    moe<float>::options o;
    o.pack_experts = pack_experts;
    o.top_k = top_k;
    o.renormalize = norm_topk_prob;
    o.n_group = n_group;
    o.topk_group = topk_group;
    o.routed_scaling_factor = routed_scaling_factor;
    o.gated = gated;
    o.capacity_factor = capacity_factor;
    o.compute_losses = compute_losses;
    if (router_kind == "softmax_topk")
      o.router = km::router_kind::softmax_topk;
    else if (router_kind == "topk_softmax")
      o.router = km::router_kind::topk_softmax;
    else if (router_kind == "sigmoid_bias")
      o.router = km::router_kind::sigmoid_bias;
    else
      c_.fail("router", "expected 'softmax_topk', 'topk_softmax' or 'sigmoid_bias', got '" +
                            router_kind + "'");
    if (activation == "silu")
      o.activation = km::expert_activation::silu;
    else if (activation == "gelu")
      o.activation = km::expert_activation::gelu;
    else if (activation == "gelu_tanh")
      o.activation = km::expert_activation::gelu_tanh;
    else if (activation == "relu2")
      o.activation = km::expert_activation::relu2;
    else
      c_.fail("activation",
              "expected 'silu', 'gelu', 'gelu_tanh' or 'relu2', got '" + activation + "'");
    if (drop == "by_score")
      o.drop = km::drop_policy::by_score;
    else if (drop == "by_position")
      o.drop = km::drop_policy::by_position;
    else
      c_.fail("drop", "expected 'by_score' or 'by_position', got '" + drop + "'");

    moe<float>::weights w;
    w.router = c_.view<2>("router_weight", router, "[E, D]");
    w.experts =
        km::expert_set<float>::fused(c_.view<3>("gate_up_proj", gate_up_proj, "[E, 2I, D]"),
                                     c_.view<3>("down_proj", down_proj, "[E, D, I]"), gated);
    w.score_bias = c_.optional_view<1>("e_score_correction_bias", bias, "[E]");
    w.shared.gate = c_.optional_view<2>("shared_gate_proj", shared_gate_proj, "[S, D]");
    w.shared.up = c_.optional_view<2>("shared_up_proj", shared_up_proj, "[S, D]");
    w.shared.down = c_.optional_view<2>("shared_down_proj", shared_down_proj, "[D, S]");
    w.shared_gate = c_.optional_view<2>("shared_expert_gate", shared_expert_gate, "[1, D]");
    block_.emplace(o, std::move(w));
  }

  py::object forward(py::object x, const std::string& form, bool return_router) {
    call<float> c("seqmix.MoE.forward", is_torch_tensor(x));
    py::array xa = c.array("x", x);
    const bool batched = xa.ndim() == 3;
    const py::object x_shape = xa.attr("shape");
    if (batched) {  // [B, T, D] -> [B*T, D] (a view when contiguous)
      xa = xa.attr("reshape")(py::make_tuple(-1, xa.shape(2)));
    }
    const auto xv = c.view<2>("x", xa, "[T, D] or [B, T, D]");
    const index_t T = xv.extent(0), D = block_->model_dim(), E = block_->num_experts(),
                  k = block_->get_options().top_k;
    c.expect_shape("x", xv, {T, D}, "[T, D]");
    auto [y, yv] = c.output<2>({T, D});
    km::router_outputs out;
    py::array logits = null_array(), ids = null_array(), weights = null_array();
    if (return_router) {
      auto l = c.output<2>({T, E});
      logits = l.first, out.logits = l.second;
      py::array_t<std::int64_t> i({static_cast<py::ssize_t>(T), static_cast<py::ssize_t>(k)});
      ids = i;
      out.ids = tensor_view<index_t, 2>(reinterpret_cast<index_t*>(i.mutable_data()), {T, k});
      auto wt = c.output<2>({T, k});
      weights = wt.first, out.weights = wt.second;
    }
    km::result r;
    const moe<float>& b = *block_;
    if (form != "auto" && form != "grouped" && form != "per_token") {
      c.fail("form", "expected 'auto', 'grouped' or 'per_token', got '" + form + "'");
    }
    nogil([&, yv = yv] {
      if (form == "grouped")
        r = b.forward_grouped(xv, yv, out);
      else if (form == "per_token")
        r = b.forward_per_token(xv, yv, out);
      else
        r = b.forward(xv, yv, out);
    });
    py::object yo = c.wrap(y);
    if (batched) yo = yo.attr("reshape")(x_shape);
    if (!return_router) return yo;
    py::dict info;
    info["aux_loss"] = r.aux_loss;
    info["z_loss"] = r.z_loss;
    info["dropped"] = r.dropped;
    info["capacity"] = r.capacity;
    info["router_logits"] = c.wrap(logits);
    info["topk_ids"] = c.wrap(ids);
    info["topk_weights"] = c.wrap(weights);
    return py::make_tuple(yo, info);
  }

  index_t num_experts() const { return block_->num_experts(); }
  index_t model_dim() const { return block_->model_dim(); }
  index_t expert_dim() const { return block_->expert_dim(); }

 private:
  call<float> c_;  // keeps the weight arrays alive
  std::optional<moe<float>> block_;
};

}  // namespace

void bind_moe(py::module_& m) {
  const auto none = py::none();
  static_assert(sizeof(index_t) == sizeof(std::int64_t));
  py::class_<moe_object>(
      m, "MoE",
      "Mixture-of-experts feed-forward block: router + top-k of E SwiGLU experts (+ a shared\n"
      "expert), transformers' weight layout, float32. Router kinds: 'softmax_topk' (Mixtral with\n"
      "norm_topk_prob=True, Qwen2/3-MoE, Qwen3-Next), 'topk_softmax' (GraniteMoe), 'sigmoid_bias'\n"
      "(DeepSeek-V3 / Kimi: e_score_correction_bias, n_group, topk_group,\n"
      "routed_scaling_factor). The experts are packed once at construction (a copy: build a new\n"
      "object after changing them) unless pack_experts=False, which uses the arrays in place.")
      .def(py::init<py::object, py::object, py::object, index_t, const std::string&, bool, index_t,
                    index_t, float, py::object, py::object, py::object, py::object, py::object,
                    const std::string&, bool, float, const std::string&, bool, bool>(),
           "router_weight"_a, "gate_up_proj"_a, "down_proj"_a, py::kw_only(), "top_k"_a = 2,
           "router"_a = "softmax_topk", "norm_topk_prob"_a = false, "n_group"_a = 1,
           "topk_group"_a = 1, "routed_scaling_factor"_a = 1.0f, "e_score_correction_bias"_a = none,
           "shared_gate_proj"_a = none, "shared_up_proj"_a = none, "shared_down_proj"_a = none,
           "shared_expert_gate"_a = none, "activation"_a = "silu", "gated"_a = true,
           "capacity_factor"_a = 0.0f, "drop"_a = "by_score", "compute_losses"_a = true,
           "pack_experts"_a = true,
           "router_weight: [E, D] (gate.weight); gate_up_proj: [E, 2I, D] (rows 0..I-1 gate,\n"
           "I..2I-1 up; [E, I, D] when gated=False); down_proj: [E, D, I]; shared_*_proj:\n"
           "[S, D] / [S, D] / [D, S]; shared_expert_gate: [1, D]; e_score_correction_bias: [E].\n"
           "capacity_factor: 0 = unlimited, else C = ceil(T k / E * factor). pack_experts: pack\n"
           "the experts once (faster prefill; a copy) or read the arrays in place.")
      .def("forward", &moe_object::forward, "x"_a, "form"_a = "auto", "return_router"_a = false,
           "x: [T, D] or [B, T, D] float32. form: 'auto', 'grouped' (prefill) or 'per_token'\n"
           "(decode). Returns y (x's shape), or (y, info) with return_router=True: info has\n"
           "aux_loss, z_loss, dropped, capacity, router_logits [T, E], topk_ids [T, k] (int64),\n"
           "topk_weights [T, k].")
      .def(
          "__call__", [](moe_object& self, py::object x) { return self.forward(x, "auto", false); },
          "x"_a, "y = block(x): forward(x) with form='auto'.")
      .def_property_readonly("num_experts", &moe_object::num_experts)
      .def_property_readonly("model_dim", &moe_object::model_dim)
      .def_property_readonly("expert_dim", &moe_object::expert_dim);
}

}  // namespace seqmix::python
