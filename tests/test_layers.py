"""Per-layer coverage: `contract` against c * vmap(grad) . d, many Flax layers.

Every case builds a small flax.linen model and a per-example loss, runs
`value_grad_and_factors` and `contract` on 3 random directions, and compares
with per-example gradients from `jax.vmap(jax.grad)` over single-example
batches (the definition of x_i, independent of the library's rules).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
from optax_shapley import contraction

B, T, D, C, VOCAB = 4, 6, 8, 3, 11
T_TRAIN, T_VAL = 8, 5
F32, BF16 = jnp.float32, jnp.bfloat16


# ----------------------------------------------------------------- helpers


def _rng(seed):
  return np.random.default_rng(seed)


# Random data come from numpy: eager jax.random at many new shapes would
# compile one small kernel per shape, which dominates the runtime here.
def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * _rng(seed).standard_normal(shape), F32)


def _labels(seed, shape=(B,), n=C):
  return jnp.asarray(_rng(seed).integers(0, n, shape), jnp.int32)


def _random_like(tree, seed=11):
  """Random values for a tree of shapes: O(1) activations, no special values
  (zero biases, unit scales) that could let a rule ignoring a parameter pass.

  Built on the host from `jax.eval_shape` shapes: compiling `model.init` for
  every case would double the runtime of this module.
  """
  rng = _rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path[-1:])
    n = rng.standard_normal(x.shape)
    if "scale" in name or name == "['var']":
      v = 1.0 + 0.2 * np.abs(n)
    elif "bias" in name or name == "['mean']":
      v = 0.2 * n
    else:
      v = n / np.sqrt(max(int(np.prod(x.shape[:-1])), 1))
    return jnp.asarray(v, x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _directions(params, num=3, seed=7):
  rng = _rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal((num,) + x.shape), F32), params)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(F32), y)


def _classifier_loss(model, **apply_kw):
  def per_example_loss(p, x, y):
    return _ce(model.apply({"params": p}, x, **apply_kw), y)
  return per_example_loss


def _init(model, *inputs, collection="params", **static_kw):
  shapes = jax.eval_shape(
      lambda k, *a: model.init(k, *a, **static_kw), jax.random.key(3), *inputs)
  return _random_like(shapes[collection])


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


@dataclasses.dataclass
class Setup:
  params: Any
  loss: Callable                     # per_example_loss(params, *args) -> [B]
  args: tuple                        # every leaf batched on axis 0
  ref_params: Any = None             # fp32 reference (mixed precision cases)
  ref_loss: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Case:
  build: Callable[[], Setup]
  tol: float = 1e-5                  # contraction, relative to max |ref|
  grad_tol: float = 1e-5             # grads vs jax.grad of the mean loss
  check_sum: bool = False            # also reduction="sum"
  check_peg: bool = False            # also contraction.per_example_grads


def _per_example_grads_ref(loss, params, args):
  """grad l_i (c = 1) from vmap(grad) over single-example batches."""
  def one(*a):
    return jax.grad(lambda p: loss(p, *[x[None] for x in a])[0])(params)
  return jax.vmap(one)(*args)


def _dots(per_example, directions):
  return sum(jnp.einsum("b...,e...->be", g.astype(F32), d.astype(F32))
             for g, d in zip(jax.tree.leaves(per_example),
                             jax.tree.leaves(directions)))


# Compile time dominates this module; XLA's CPU backend optimisations only
# make the (microsecond) runs faster, so they are switched off here.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _jit_run(fn, *args):
  lowered = jax.jit(fn).lower(*args)
  opts = _FAST_COMPILE if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=opts)(*args)


def _run(s: Setup, directions, check_sum=False, check_peg=False):
  """Library (mean, optionally sum) and references, in one jit (one compile)."""
  ref_loss = s.loss if s.ref_loss is None else s.ref_loss
  ref_params = s.params if s.ref_params is None else s.ref_params

  def fn(params, ref_params, d, args):
    out = {}
    for red in ("mean", "sum") if check_sum else ("mean",):
      losses, grads, factors = oxs.value_grad_and_factors(
          s.loss, reduction=red)(params, *args)
      out[red] = (losses, grads, oxs.contract(factors, d))
      if check_peg and red == "mean":
        out["peg"] = contraction.per_example_grads(factors, like=grads)
    pe = _per_example_grads_ref(ref_loss, ref_params, args)
    out["ref"] = _dots(pe, d) / B
    if check_peg:
      out["ref_peg"] = jax.tree.map(lambda g: g / B, pe)
    out["loss"] = s.loss(params, *args)
    out["mean_grad"] = jax.grad(lambda p: jnp.mean(s.loss(p, *args)))(params)
    return out

  return _jit_run(fn, s.params, ref_params, directions, s.args)


def _assert_matches(s: Setup, tol=1e-5, grad_tol=1e-5, check_sum=False,
                    check_peg=False, name=""):
  d = _directions(s.params)
  out = _run(s, d, check_sum, check_peg)
  losses, grads, got = out["mean"]
  ref = np.asarray(out["ref"])
  assert got.shape == (B, 3) and got.dtype == F32
  rel = _rel(got, ref)
  assert rel <= tol, f"{name}: contraction rel err {rel:.3g}"
  np.testing.assert_allclose(losses, out["loss"], rtol=1e-6)
  # The batch gradient is jax.grad of the mean loss, in the same precision.
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(out["mean_grad"])):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _rel(a, b) <= grad_tol, f"{name}: grad rel err {_rel(a, b):.3g}"
  if check_sum:
    s_losses, s_grads, s_got = out["sum"]
    np.testing.assert_allclose(s_losses, losses, rtol=1e-6)
    assert _rel(s_got, B * np.asarray(got)) <= 1e-6
    assert _rel(s_got, B * ref) <= tol
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
      assert _rel(a, B * np.asarray(b, np.float64)) <= 1e-6
  if check_peg:
    # Formed x_i = c * grad l_i (Jacobian of the contraction). Some leaves
    # have an exactly zero gradient (an attention key bias: softmax is shift
    # invariant), so errors are relative to max(leaf max, 1e-3 * global max).
    peg, ref_peg = jax.tree.leaves(out["peg"]), jax.tree.leaves(out["ref_peg"])
    top = max(float(np.abs(np.asarray(r)).max()) for r in ref_peg)
    for g, r in zip(peg, ref_peg):
      g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
      assert g.shape == r.shape
      err = np.abs(g - r).max() / max(np.abs(r).max(), 1e-3 * top)
      assert err <= tol, f"{name}: per_example_grads rel err {err:.3g}"
  return out


# ------------------------------------------------------------------ models


class ConvNet(nn.Module):
  """Conv (or ConvTranspose) -> tanh -> spatial mean -> Dense."""
  conv: tuple                          # sorted ((kwarg, value), ...)
  transpose: bool = False

  @nn.compact
  def __call__(self, x):
    cls = nn.ConvTranspose if self.transpose else nn.Conv
    h = jnp.tanh(cls(**dict(self.conv))(x))
    h = h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1)
    return nn.Dense(C)(h)


def _conv_case(ndim, transpose=False, **kw):
  kw.setdefault("features", 4)
  def build():
    model = ConvNet(conv=tuple(sorted(kw.items())), transpose=transpose)
    x = _normal(1, (B,) + (7, 6)[:ndim] + (4,))
    params = _init(model, x)
    return Setup(params, _classifier_loss(model), (x, _labels(2)))
  return build


class DenseGeneralNet(nn.Module):
  @nn.compact
  def __call__(self, x):               # [B, T, D]
    h = jnp.tanh(nn.DenseGeneral((2, 3))(x))            # [B, T, 2, 3]
    h = jnp.tanh(nn.DenseGeneral(5, axis=(-2, -1))(h))  # [B, T, 5]
    h = nn.DenseGeneral((2, C), axis=(-2, -1), use_bias=False)(h)  # [B, 2, C]
    return h.sum(axis=1)


class EinsumNet(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):               # [B, T, D]
    h = nn.Einsum((D, 5), "btd,dh->bth", use_bias=self.use_bias)(x)
    h = nn.Einsum((5, C), "bth,hc->btc", use_bias=self.use_bias)(jnp.tanh(h))
    return h.mean(axis=1)


def _seq_classifier(model_fn):
  def build():
    model = model_fn()
    x = _normal(1, (B, T, D))
    return Setup(_init(model, x), _classifier_loss(model), (x, _labels(2)))
  return build


class AttnNet(nn.Module):
  self_attention: bool
  mask: str                            # "causal" | "padding"

  @nn.compact
  def __call__(self, x, pad):          # x [B, T, D], pad [B, T] of 0/1
    if self.mask == "causal":
      m = nn.make_causal_mask(pad)
    else:
      m = nn.make_attention_mask(pad > 0, pad > 0)
    if self.self_attention:
      h = nn.SelfAttention(num_heads=2, qkv_features=8)(x, mask=m)
    else:
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x, x, mask=m)
    h = nn.LayerNorm()(x + h)
    pooled = (h * pad[..., None]).sum(1) / pad.sum(1, keepdims=True)
    return nn.Dense(C)(pooled)


def _pad_mask(lengths, t):
  return jnp.asarray(np.arange(t)[None, :] < np.asarray(lengths)[:, None], F32)


def _attn_case(self_attention, mask):
  def build():
    model = AttnNet(self_attention=self_attention, mask=mask)
    x = _normal(1, (B, T, D))
    pad = _pad_mask([T, 4, 2, 5], T)
    params = _init(model, x, pad)

    def loss(p, x, pad, y):
      return _ce(model.apply({"params": p}, x, pad), y)
    return Setup(params, loss, (x, pad, _labels(2)))
  return build


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tok):             # int[B, T] -> [B, T, VOCAB]
    emb = nn.Embed(VOCAB, D)
    h = emb(tok)
    h = h + nn.Dense(D)(jnp.tanh(h))
    h = nn.LayerNorm()(h)
    return emb.attend(h)


def _token_loss(model):
  def loss(p, tok, tgt):
    return _ce(model.apply({"params": p}, tok), tgt).mean(axis=-1)
  return loss


def _tied_case():
  model = TiedLM()
  tok = _labels(1, (B, T), VOCAB)
  tgt = _labels(2, (B, T), VOCAB)
  return Setup(_init(model, tok), _token_loss(model), (tok, tgt))


class NormNet(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, x):               # [B, T, D]
    h = nn.Dense(D)(x)
    h = {
        "rms": lambda: nn.RMSNorm(),
        "group": lambda: nn.GroupNorm(num_groups=2),
        "group_no_scale": lambda: nn.GroupNorm(num_groups=2, use_scale=False),
        "ln_no_scale": lambda: nn.LayerNorm(use_scale=False),
        "ln_no_bias": lambda: nn.LayerNorm(use_bias=False),
        "ln_no_params": lambda: nn.LayerNorm(use_scale=False, use_bias=False),
    }[self.norm]()(h)
    return nn.Dense(C)(jnp.tanh(h).mean(axis=1))


class PosNet(nn.Module):
  shape: tuple                         # (1, T, D) or (T, D)

  @nn.compact
  def __call__(self, x):               # [B, T, D]
    pos = self.param("pos", nn.initializers.normal(0.5), self.shape)
    h = jnp.tanh(nn.Dense(D)(x + pos))
    return nn.Dense(C)(h.mean(axis=1))


class SharedTwice(nn.Module):
  @nn.compact
  def __call__(self, x):               # [B, T, D]
    dense = nn.Dense(D)
    h = jnp.tanh(dense(x))
    h = jnp.tanh(dense(h))
    return nn.Dense(C)(h.mean(axis=1))


class ResidualReuse(nn.Module):
  @nn.compact
  def __call__(self, x):               # [B, T, D]
    f = nn.Dense(D)
    h = nn.Dense(D)(x)
    h = h + jnp.tanh(f(h))
    h = h + jnp.tanh(f(h))
    return nn.Dense(C)(h.mean(axis=1))


class LearnedQuery(nn.Module):
  """One Dense on the batch [B, T, D] and on an unbatched query [K, D]."""
  k: int

  @nn.compact
  def __call__(self, x):
    q = self.param("query", nn.initializers.normal(1.0), (self.k, D))
    proj = nn.Dense(D)
    kx, kq = proj(x), proj(q)                            # [B, T, D], [K, D]
    a = jax.nn.softmax(jnp.einsum("btf,kf->bkt", kx, kq) / np.sqrt(D), -1)
    pooled = jnp.einsum("bkt,btf->bkf", a, kx).reshape(x.shape[0], -1)
    return nn.Dense(C)(pooled)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _=None):
    h = h + jnp.tanh(nn.Dense(D)(nn.LayerNorm()(h)))
    return h, None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D)(x)
    stack = nn.scan(Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    h, _ = stack()(h, None)
    return nn.Dense(C)(h.mean(axis=1))


class RematNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D)(x)
    for _ in range(2):
      h, _ = nn.remat(Block)()(h)
    return nn.Dense(C)(h.mean(axis=1))


class MaskedLM(nn.Module):
  """Learned positions sliced to the input length: accepts T=8 and T=5."""
  dtype: Any = None

  @nn.compact
  def __call__(self, tok):             # int[B, t], t <= T_TRAIN
    t = tok.shape[1]
    emb = nn.Embed(VOCAB, D, dtype=self.dtype)
    pos = self.param("pos", nn.initializers.normal(0.1), (T_TRAIN, D))
    e = emb(tok)
    h = e + pos[:t].astype(e.dtype)
    h = h + nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=8, dtype=self.dtype)(
            h, h, mask=nn.make_causal_mask(tok))
    h = h + nn.Conv(D, (3,), padding="CAUSAL", dtype=self.dtype)(jnp.tanh(h))
    h = h + nn.Dense(D, dtype=self.dtype)(jnp.tanh(h))
    h = nn.LayerNorm(dtype=self.dtype)(h)
    return emb.attend(h)


def _masked_token_loss(model):
  def loss(p, tok, tgt, mask):
    ce = _ce(model.apply({"params": p}, tok), tgt)
    return (ce * mask).sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)
  return loss


def _seq_batch(t, lengths, seed=1):
  tok = _labels(seed, (len(lengths), t), VOCAB)
  tgt = _labels(seed + 1, (len(lengths), t), VOCAB)
  return tok, tgt, _pad_mask(lengths, t)


def _sequence_case():
  model = MaskedLM()
  tok, tgt, mask = _seq_batch(T_TRAIN, [8, 5, 3, 1])
  params = _init(model, tok)
  loss = _masked_token_loss(model)
  # The same model and loss accept a validation batch of length T_VAL.
  vtok, vtgt, vmask = _seq_batch(T_VAL, [5, 2, 4], seed=5)
  assert jax.eval_shape(loss, params, vtok, vtgt, vmask).shape == (3,)
  return Setup(params, loss, (tok, tgt, mask))


def _bf16_activations_case():
  """Modules with dtype=bfloat16, params float32; reference: dtype=float32."""
  tok, tgt, mask = _seq_batch(T_TRAIN, [8, 5, 3, 1])
  params = _init(MaskedLM(dtype=F32), tok)
  return Setup(params, _masked_token_loss(MaskedLM(dtype=BF16)), (tok, tgt, mask),
               ref_params=params, ref_loss=_masked_token_loss(MaskedLM(dtype=F32)))


def _bf16_params_case():
  """Params cast to bfloat16 (so activations are bf16); reference: the same
  (bf16-rounded) values in float32, computed in float32."""
  tok, tgt, mask = _seq_batch(T_TRAIN, [8, 5, 3, 1])
  model = MaskedLM()
  params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(BF16)),
                        _init(model, tok))
  loss = _masked_token_loss(model)
  return Setup(params, loss, (tok, tgt, mask),
               ref_params=jax.tree.map(
                   lambda x: jnp.asarray(np.asarray(x).astype(np.float32)), params),
               ref_loss=loss)


CASES = {
    # 1. Conv, 1-D and 2-D.
    "conv1d_same_stride2": Case(_conv_case(1, kernel_size=(3,), strides=2,
                                           padding="SAME"), check_sum=True),
    "conv1d_valid_kdil2_nobias": Case(_conv_case(
        1, kernel_size=(3,), padding="VALID", kernel_dilation=2, use_bias=False)),
    "conv1d_explicit_indil2": Case(_conv_case(
        1, kernel_size=(2,), padding=((1, 2),), input_dilation=2)),
    "conv1d_explicit_list_padding": Case(_conv_case(
        1, kernel_size=(3,), padding=[(2, 0)])),
    "conv1d_causal": Case(_conv_case(1, kernel_size=(3,), padding="CAUSAL")),
    "conv1d_groups2": Case(_conv_case(1, kernel_size=(3,), padding="SAME",
                                      feature_group_count=2)),
    "conv2d_same_stride": Case(_conv_case(2, kernel_size=(3, 3), strides=(2, 1),
                                          padding="SAME"), check_sum=True),
    "conv2d_valid_kdil_nobias": Case(_conv_case(
        2, kernel_size=(2, 2), padding="VALID", kernel_dilation=(2, 1),
        use_bias=False)),
    "conv2d_explicit_indil": Case(_conv_case(
        2, kernel_size=(2, 3), padding=((1, 0), (0, 1)), input_dilation=(1, 2))),
    "conv2d_groups2_nobias": Case(_conv_case(
        2, kernel_size=(3, 3), padding="SAME", feature_group_count=2,
        use_bias=False)),
    "conv2d_groups4_stride_kdil": Case(_conv_case(
        2, features=8, kernel_size=(2, 2), strides=2, padding="SAME",
        feature_group_count=4, kernel_dilation=2), check_peg=True),
    # 2. ConvTranspose.
    "conv_transpose1d": Case(_conv_case(
        1, transpose=True, kernel_size=(3,), strides=(2,), padding="SAME"),
                             check_peg=True),
    "conv_transpose2d_nobias": Case(_conv_case(
        2, transpose=True, kernel_size=(2, 3), strides=(2, 1), padding="VALID",
        use_bias=False)),
    # 3. DenseGeneral, Einsum.
    "dense_general_multi_axis": Case(_seq_classifier(DenseGeneralNet),
                                     check_sum=True, check_peg=True),
    "einsum": Case(_seq_classifier(EinsumNet)),
    "einsum_nobias": Case(_seq_classifier(lambda: EinsumNet(use_bias=False))),
    # 4. Attention.
    "mha_causal": Case(_attn_case(False, "causal"), check_sum=True),
    "mha_padding": Case(_attn_case(False, "padding"), check_peg=True),
    "self_attention_causal": Case(_attn_case(True, "causal")),
    "self_attention_padding": Case(_attn_case(True, "padding")),
    # 5. Tied embedding.
    "tied_embed_attend": Case(_tied_case, check_sum=True, check_peg=True),
    # 6. Norms inside a model with other params.
    "rmsnorm": Case(_seq_classifier(lambda: NormNet("rms"))),
    "groupnorm2": Case(_seq_classifier(lambda: NormNet("group")), check_peg=True),
    "groupnorm2_no_scale": Case(_seq_classifier(lambda: NormNet("group_no_scale"))),
    "layernorm_no_scale": Case(_seq_classifier(lambda: NormNet("ln_no_scale"))),
    "layernorm_no_bias": Case(_seq_classifier(lambda: NormNet("ln_no_bias"))),
    "layernorm_no_params": Case(_seq_classifier(lambda: NormNet("ln_no_params"))),
    # 7. Raw learned positions.
    "raw_pos_1td": Case(_seq_classifier(lambda: PosNet((1, T, D)))),
    "raw_pos_td": Case(_seq_classifier(lambda: PosNet((T, D))), check_peg=True),
    # 8. Modules called several times.
    "shared_dense_twice": Case(_seq_classifier(SharedTwice), check_sum=True),
    "residual_reuse": Case(_seq_classifier(ResidualReuse)),
    "learned_query_k3": Case(_seq_classifier(lambda: LearnedQuery(3))),
    "learned_query_k_eq_b": Case(_seq_classifier(lambda: LearnedQuery(B)),
                                 check_peg=True),
    # 9. Lifted transforms.
    "scan_3_blocks": Case(_seq_classifier(ScanNet), check_sum=True,
                          check_peg=True),
    "remat_blocks": Case(_seq_classifier(RematNet)),
    # 10. Mixed precision, against a float32 reference. Measured on CPU
    # (jax 0.12.0.1, flax 0.12.12): contraction rel err 6.2e-3 (bf16
    # activations) and 5.3e-3 (bf16 params); for scale, vmap(grad) of the same
    # bf16 model is itself 8.5e-3 and 5.1e-3 off the fp32 reference, and the
    # library is 3.6e-3 / 2.6e-3 off it. grads vs jax.grad of the same bf16
    # model: 0 (bit-identical).
    "bf16_activations": Case(_bf16_activations_case, tol=1.5e-2, grad_tol=1e-2),
    "bf16_params": Case(_bf16_params_case, tol=1.5e-2, grad_tol=1e-2),
    # 11. Sequence loss over a padding mask, T=8 (model also accepts T=5).
    "masked_sequence_loss": Case(_sequence_case, check_sum=True, check_peg=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_contraction_matches_vmap_grad(name):
  case = CASES[name]
  _assert_matches(case.build(), case.tol, case.grad_tol, case.check_sum,
                  case.check_peg, name)


# ------------------------------------------------------------ error cases


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(D)(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    return nn.Dense(C)(jnp.tanh(h))


def test_batchnorm_training_is_refused_and_eval_mode_matches():
  model = BNNet()
  x, y = _normal(1, (B, D)), _labels(2)
  params = _init(model, x, train=False)
  stats = _init(model, x, collection="batch_stats", train=False)   # var > 0

  def train_loss(p, x, y):
    out, _ = model.apply({"params": p, "batch_stats": stats}, x, True,
                         mutable=["batch_stats"])
    return _ce(out, y)

  with pytest.raises(oxs.UnsupportedModuleError, match="BatchNorm"):
    oxs.value_grad_and_factors(train_loss)(params, x, y)

  def eval_loss(p, x, y):   # batch_stats: a closed-over constant
    return _ce(model.apply({"params": p, "batch_stats": stats}, x, False), y)

  _assert_matches(Setup(params, eval_loss, (x, y)), check_sum=True)


class DropNet(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool):
    h = jnp.tanh(nn.Dense(16)(x))
    h = nn.Dropout(rate=0.5)(h, deterministic=deterministic)
    return nn.Dense(C)(h)


def _drop_setup():
  model = DropNet()
  x, y = _normal(1, (B, D)), _labels(2)
  params = _init(model, x, deterministic=True)
  return model, params, x, y


def test_dropout_on_the_whole_batch_with_one_rng_is_refused():
  # Example i's mask depends on its position in the batch and on B, so l_i is
  # not a function of example i alone.
  model, params, x, y = _drop_setup()
  key = jax.random.key(9)

  def loss(p, x, y):
    return _ce(model.apply({"params": p}, x, False, rngs={"dropout": key}), y)

  with pytest.raises(oxs.UnsupportedModuleError, match="Dropout"):
    oxs.value_grad_and_factors(loss)(params, x, y)


def test_dropout_deterministic_matches():
  model, params, x, y = _drop_setup()

  def loss(p, x, y):
    return _ce(model.apply({"params": p}, x, True), y)

  _assert_matches(Setup(params, loss, (x, y)))


def test_dropout_with_per_example_rng_matches():
  model, params, x, y = _drop_setup()
  keys = jax.random.split(jax.random.key(9), B)

  def loss(p, x, keys, y):
    def single(xi, ki, yi):
      out = model.apply({"params": p}, xi[None], False, rngs={"dropout": ki})
      return _ce(out[0], yi)
    return jax.vmap(single)(x, keys, y)

  out = _assert_matches(Setup(params, loss, (x, keys, y)), check_sum=True)
  # The keys really drop units: the losses differ from deterministic ones.
  det = jax.jit(lambda p: _ce(model.apply({"params": p}, x, True), y))(params)
  assert np.abs(np.asarray(out["loss"]) - np.asarray(det)).max() > 1e-3
