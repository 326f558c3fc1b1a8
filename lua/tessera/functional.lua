-- tessera.functional — layers, normalization, softmax, dropout and losses in T.F, with PyTorch's
-- (torch.nn.functional) names, arguments and defaults:
--
--   T.F.linear(x, w, b)                                      y = x @ w^T + b; b may be nil
--   T.F.layer_norm(x, normalized_shape, w, b, eps = 1e-5)    normalized_shape: a size or a list
--   T.F.batch_norm(x, running_mean, running_var, w, b, training = false, momentum = 0.1, eps = 1e-5)
--       training: normalize with the batch statistics and update the running ones in place;
--       otherwise normalize with the running statistics
--   T.F.group_norm(x, num_groups, w, b, eps = 1e-5)
--   T.F.softmax(x, dim)   T.F.log_softmax(x, dim)            also t:softmax(dim), T.softmax(t, dim)
--   T.F.dropout(x, p = 0.5, training = true, generator)     inverted dropout (kept values / (1-p))
--   T.F.drop_path(x, p = 0, training = false, scale_by_keep = true, generator)   timm's stochastic depth
--   T.F.cross_entropy(logits, target, {weight =, ignore_index = -100, label_smoothing = 0,
--                                      reduction = 'mean'})
--       target: int64 class indices [N, d1, ...] or class probabilities shaped like the logits
--   T.F.mse_loss(a, b, {reduction = 'mean'})   T.F.l1_loss(a, b, {reduction =})
--   T.F.smooth_l1_loss(a, b, {beta = 1, reduction = 'mean'})
--   T.F.gelu, relu, silu, sigmoid, tanh                      the elementwise ops
--
-- Every op is differentiable in its floating inputs (weights, biases, soft targets included; the
-- class weights of cross_entropy excepted, as in PyTorch), with one fused kernel forward and one
-- backward. p = 0 or training = false make dropout and drop_path return x itself.
local core = require 'tessera.core'
local C, T, Tensor = core.C, core.T, core.Tensor
local wrap, handle = core.wrap, core.handle

T.F = T.F or {}
local F = T.F

-- ---- argument parsing --------------------------------------------------------------------------
-- The C handle of an optional tensor argument (nil gives NULL).
local function optional(t, what)
  if t == nil then return nil end
  return handle(t, what)
end

local check_number, check_boolean, check_probability = core.check_number, core.check_boolean, core.check_probability

local reductions = { none = C.TS_REDUCTION_NONE, mean = C.TS_REDUCTION_MEAN, sum = C.TS_REDUCTION_SUM }
local function reduction(what, r)
  if r == nil then return C.TS_REDUCTION_MEAN end
  local id = reductions[r]
  if id == nil then
    error(string.format("%s: reduction must be 'none', 'mean' or 'sum', got %s", what, tostring(r)), 0)
  end
  return id
end

-- nil, a Generator, or (as T.rand's options) a table holding one.
local function generator(what, g)
  if g == nil then return nil end
  if type(g) == 'table' and not T.is_generator(g) and g.generator ~= nil then g = g.generator end
  if not T.is_generator(g) then error(string.format('%s: expected a Generator, got %s', what, type(g)), 0) end
  return g.h
end

local function dim_arg(what, dim)
  if dim == nil then error(what .. ': dim is required (the dim to normalize over)', 0) end
  core.int(dim, what)
  if dim < -2 ^ 31 or dim >= 2 ^ 31 then error(string.format('%s: dim %d out of range', what, dim), 0) end
  return dim
end

-- ---- linear ------------------------------------------------------------------------------------
function F.linear(x, w, b)
  return wrap(C.ts_linear(handle(x, 'linear'), handle(w, 'linear'), optional(b, 'linear')))
end

-- ---- normalization -----------------------------------------------------------------------------
-- normalized_shape must equal the input's trailing dims, as torch checks.
local function normalized_dims(x, normalized_shape)
  local shape = type(normalized_shape) == 'table' and normalized_shape or { normalized_shape }
  local xs = core.shape_of(handle(x, 'layer_norm'))
  local ok = #shape >= 1 and #shape <= #xs
  for i = 1, #shape do
    core.int(shape[i], 'layer_norm normalized_shape')
    ok = ok and shape[i] == xs[#xs - #shape + i]
  end
  if not ok then
    error(string.format('layer_norm: normalized_shape [%s] does not match the trailing dims of the input [%s]',
      table.concat(shape, ','), table.concat(xs, ',')), 0)
  end
  return #shape
end

function F.layer_norm(x, normalized_shape, w, b, eps)
  local nnorm = normalized_dims(x, normalized_shape)
  return wrap(C.ts_layer_norm(x.h, nnorm, optional(w, 'layer_norm'), optional(b, 'layer_norm'),
    check_number('layer_norm', 'eps', eps, 1e-5)))
end

function F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
  local what = 'batch_norm'
  return wrap(C.ts_batch_norm(handle(x, what), optional(running_mean, what), optional(running_var, what),
    optional(w, what), optional(b, what), check_boolean(what, 'training', training, false) and 1 or 0,
    check_number(what, 'momentum', momentum, 0.1), check_number(what, 'eps', eps, 1e-5)))
end

function F.group_norm(x, num_groups, w, b, eps)
  local what = 'group_norm'
  return wrap(C.ts_group_norm(handle(x, what), core.int(num_groups, 'group_norm num_groups'), optional(w, what),
    optional(b, what), check_number(what, 'eps', eps, 1e-5)))
end

-- ---- softmax -----------------------------------------------------------------------------------
function F.softmax(x, dim) return wrap(C.ts_softmax(handle(x, 'softmax'), dim_arg('softmax', dim))) end
function F.log_softmax(x, dim) return wrap(C.ts_log_softmax(handle(x, 'log_softmax'), dim_arg('log_softmax', dim))) end
Tensor.softmax, Tensor.log_softmax = F.softmax, F.log_softmax
T.softmax, T.log_softmax = F.softmax, F.log_softmax

-- ---- dropout -----------------------------------------------------------------------------------
function F.dropout(x, p, training, gen)
  local what = 'dropout'
  p = check_probability(what, 'p', p, 0.5)
  local training_flag = check_boolean(what, 'training', training, true) and 1 or 0
  return wrap(C.ts_dropout(handle(x, what), p, training_flag, generator(what, gen)))
end

function F.drop_path(x, p, training, scale_by_keep, gen)
  local what = 'drop_path'
  p = check_probability(what, 'p', p, 0)
  return wrap(C.ts_drop_path(handle(x, what), p, check_boolean(what, 'training', training, false) and 1 or 0,
    check_boolean(what, 'scale_by_keep', scale_by_keep, true) and 1 or 0, generator(what, gen)))
end

-- ---- losses ------------------------------------------------------------------------------------
local cross_entropy_options = { weight = true, ignore_index = true, label_smoothing = true, reduction = true }
function F.cross_entropy(logits, target, opts)
  local what = 'cross_entropy'
  local o = core.options(what, opts, cross_entropy_options)
  local ignore = o.ignore_index == nil and -100 or core.int(o.ignore_index, 'cross_entropy ignore_index')
  local smoothing = check_probability(what, 'label_smoothing', o.label_smoothing, 0)
  return wrap(C.ts_cross_entropy(handle(logits, what), handle(target, what), optional(o.weight, what), ignore,
    smoothing, reduction(what, o.reduction)))
end

local reduction_only = { reduction = true }
function F.mse_loss(a, b, opts)
  local o = core.options('mse_loss', opts, reduction_only)
  return wrap(C.ts_mse_loss(handle(a, 'mse_loss'), handle(b, 'mse_loss'), reduction('mse_loss', o.reduction)))
end

function F.l1_loss(a, b, opts)
  local o = core.options('l1_loss', opts, reduction_only)
  return wrap(C.ts_l1_loss(handle(a, 'l1_loss'), handle(b, 'l1_loss'), reduction('l1_loss', o.reduction)))
end

local smooth_l1_options = { beta = true, reduction = true }
function F.smooth_l1_loss(a, b, opts)
  local what = 'smooth_l1_loss'
  local o = core.options(what, opts, smooth_l1_options)
  local beta = check_number(what, 'beta', o.beta, 1)
  if beta < 0 then error(string.format('smooth_l1_loss: beta must be non-negative, got %s', tostring(beta)), 0) end
  return wrap(C.ts_smooth_l1_loss(handle(a, what), handle(b, what), beta, reduction(what, o.reduction)))
end

-- ---- activations: the elementwise ops under torch.nn.functional's names -------------------------
function F.gelu(x, opts)
  local o = core.options('gelu', opts, { approximate = true })
  if o.approximate ~= nil and o.approximate ~= 'none' then
    error(string.format("gelu: approximate = %s is not supported; only the exact (erf) form 'none' is",
      tostring(o.approximate)), 0)
  end
  return Tensor.gelu(x)
end
function F.relu(x) return Tensor.relu(x) end
function F.silu(x) return Tensor.silu(x) end
function F.sigmoid(x) return Tensor.sigmoid(x) end
function F.tanh(x) return Tensor.tanh(x) end

return F
