-- nn_functional_spec.lua — T.F.linear, layer_norm, batch_norm, group_norm, softmax, log_softmax,
-- dropout, drop_path, cross_entropy, mse_loss, l1_loss, smooth_l1_loss: forward against plain-Lua
-- float64 references, gradients by T.gradcheck (float64 central differences), errors by message.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local F = T.F

local numel = S.numel

-- A float64 tensor of the given shape with values in [lo, hi), strided when asked, and its flat values.
local function rand_values(shape, seed, lo, hi, strided)
  local flat = S.randoms(numel(shape), seed, lo or -1, hi or 1)
  local t = T.tensor(S.nest(flat, shape), { dtype = 'float64' })
  if strided then t = S.noncontiguous(t) end
  return t, flat
end

local function rand(...) return (rand_values(...)) end

local leaf, gradcheck = S.grad_leaf, S.gradcheck

local function flat(t) return S.flatten({ t:totable() }) end

local function mean_of(v, i0, n, step)
  local s = 0
  for k = 0, n - 1 do s = s + v[i0 + k * (step or 1)] end
  return s / n
end

-- ---- references ------------------------------------------------------------------------------------
local function ref_linear(x, w, b, m, k, n)
  local y = {}
  for r = 0, m - 1 do
    for j = 0, n - 1 do
      local s = b and b[j + 1] or 0
      for i = 0, k - 1 do s = s + x[r * k + i + 1] * w[j * k + i + 1] end
      y[r * n + j + 1] = s
    end
  end
  return y
end

-- Normalizes `count` values at base, base + step, ... (1-based), returning them with mean/var.
local function ref_normalize(v, base, count, step, eps)
  local mu = mean_of(v, base, count, step)
  local var = 0
  for k = 0, count - 1 do var = var + (v[base + k * step] - mu) ^ 2 end
  var = var / count
  local out = {}
  for k = 0, count - 1 do out[k + 1] = (v[base + k * step] - mu) / math.sqrt(var + eps) end
  return out, mu, var
end

local function ref_layer_norm(x, m, n, w, b, eps)
  local y = {}
  for r = 0, m - 1 do
    local z = ref_normalize(x, r * n + 1, n, 1, eps)
    for j = 1, n do y[r * n + j] = z[j] * (w and w[j] or 1) + (b and b[j] or 0) end
  end
  return y
end

-- x [N, C, S]; per channel mean and biased var over N and S.
local function channel_stats(x, n, c, s)
  local mean, var = {}, {}
  for ch = 0, c - 1 do
    local sum, count = 0, n * s
    for i = 0, n - 1 do for j = 0, s - 1 do sum = sum + x[(i * c + ch) * s + j + 1] end end
    mean[ch + 1] = sum / count
    local q = 0
    for i = 0, n - 1 do for j = 0, s - 1 do q = q + (x[(i * c + ch) * s + j + 1] - mean[ch + 1]) ^ 2 end end
    var[ch + 1] = q / count
  end
  return mean, var
end

local function ref_batch_norm(x, n, c, s, mean, var, w, b, eps)
  local y = {}
  for i = 0, n - 1 do
    for ch = 1, c do
      for j = 0, s - 1 do
        local at = ((i * c) + ch - 1) * s + j + 1
        y[at] = (x[at] - mean[ch]) / math.sqrt(var[ch] + eps) * (w and w[ch] or 1) + (b and b[ch] or 0)
      end
    end
  end
  return y
end

local function ref_group_norm(x, n, c, s, groups, w, b, eps)
  local y, per = {}, c / groups
  for i = 0, n - 1 do
    for g = 0, groups - 1 do
      local base = (i * c + g * per) * s + 1
      local z = ref_normalize(x, base, per * s, 1, eps)
      for k = 0, per * s - 1 do
        local ch = g * per + math.floor(k / s) + 1
        y[base + k] = z[k + 1] * (w and w[ch] or 1) + (b and b[ch] or 0)
      end
    end
  end
  return y
end

-- softmax over dim of a row-major tensor of `shape` (0-based dim).
local function ref_softmax(x, shape, dim, log)
  local a, d, b = 1, shape[dim + 1], 1
  for i = 1, dim do a = a * shape[i] end
  for i = dim + 2, #shape do b = b * shape[i] end
  local y = {}
  for i = 0, a - 1 do
    for j = 0, b - 1 do
      local mx = -math.huge
      for k = 0, d - 1 do mx = math.max(mx, x[(i * d + k) * b + j + 1]) end
      local sum = 0
      for k = 0, d - 1 do sum = sum + math.exp(x[(i * d + k) * b + j + 1] - mx) end
      for k = 0, d - 1 do
        local v = x[(i * d + k) * b + j + 1] - mx
        y[(i * d + k) * b + j + 1] = log and v - math.log(sum) or math.exp(v) / sum
      end
    end
  end
  return y
end

-- PyTorch's cross_entropy on logits [N, C, S] (flat); target: class indices [N*S] (0-based) or
-- probabilities [N, C, S]. Returns the per-position losses and the mean's divisor.
local function ref_cross_entropy(z, n, c, s, target, soft, o)
  local eps, ignore = o.label_smoothing or 0, o.ignore_index or -100
  local w = o.weight or {}
  local losses, total = {}, 0
  for i = 0, n - 1 do
    for j = 0, s - 1 do
      local at = function(k) return (i * c + k) * s + j + 1 end
      local mx = -math.huge
      for k = 0, c - 1 do mx = math.max(mx, z[at(k)]) end
      local sum = 0
      for k = 0, c - 1 do sum = sum + math.exp(z[at(k)] - mx) end
      local lse = mx + math.log(sum)
      local loss = 0
      if soft then
        for k = 0, c - 1 do
          local q = (target[at(k)] * (1 - eps) + eps / c) * (w[k + 1] or 1)
          loss = loss + q * (lse - z[at(k)])
        end
        total = total + 1
      else
        local t = target[i * s + j + 1]
        if t ~= ignore then
          local wt = w[t + 1] or 1
          loss = (1 - eps) * wt * (lse - z[at(t)])
          for k = 0, c - 1 do loss = loss + eps / c * (w[k + 1] or 1) * (lse - z[at(k)]) end
          total = total + wt
        end
      end
      losses[i * s + j + 1] = loss
    end
  end
  return losses, total
end

local function reduce(values, reduction, divisor)
  if reduction == 'none' then return values end
  local s = 0
  for _, v in ipairs(values) do s = s + v end
  if reduction == 'sum' then return s end
  return s / (divisor or #values)
end

local function int64(list, shape)
  return T.tensor(S.nest(list, shape or { #list }), { dtype = 'int64' })
end

-- ---- linear ----------------------------------------------------------------------------------------
describe('F.linear', function()
  it('matches x @ w^T + b over any leading dims, with and without bias', function()
    local x, xv = rand_values({ 2, 3, 4 }, 1)
    local w, wv = rand_values({ 5, 4 }, 2)
    local b, bv = rand_values({ 5 }, 3)
    local y = F.linear(x, w, b)
    assert.same({ 2, 3, 5 }, y.shape)
    S.assert_close(flat(y), ref_linear(xv, wv, bv, 6, 4, 5), 1e-12)
    S.assert_close(flat(F.linear(x, w)), ref_linear(xv, wv, nil, 6, 4, 5), 1e-12)
    local v = rand({ 4 }, 4)
    assert.same({ 5 }, F.linear(v, w, b).shape)
  end)

  it('reads transposed and strided operands without changing the result', function()
    local x, xv = rand_values({ 3, 4 }, 5)
    local w, wv = rand_values({ 5, 4 }, 6)
    local wt = w:t():contiguous():t()          -- column-major weight (tied-embedding style)
    local xt = x:t():contiguous():t()          -- column-major input
    local xs = S.noncontiguous(x)              -- strided in both dims: copied
    local expected = ref_linear(xv, wv, nil, 3, 4, 5)
    S.assert_close(flat(F.linear(xt, wt)), expected, 1e-12)
    S.assert_close(flat(F.linear(xs, w)), expected, 1e-12)
    S.assert_close(flat(F.linear(x:float(), w:float())), expected, 1e-5)
    S.assert_close(flat(F.linear(x:to('bfloat16'), w:to('bfloat16')):double()), expected, 0.05, 0.05)
  end)

  it('handles empty batches and zero input features', function()
    local w, b = rand({ 3, 0 }, 7), rand({ 3 }, 8)
    local y = F.linear(T.zeros({ 2, 0 }, { dtype = 'float64' }), w, b)
    S.assert_close(y, b:expand(2, 3):contiguous())
    assert.same({ 0, 3 }, F.linear(T.zeros({ 0, 4 }, { dtype = 'float64' }), rand({ 3, 4 }, 9)).shape)
  end)

  it('differentiates x, w and b (batched, strided)', function()
    local x, w, b = leaf({ 2, 3, 4 }, 10, -1, 1, true), leaf({ 5, 4 }, 11), leaf({ 5 }, 12)
    gradcheck('linear', F.linear, { x, w, b })
    gradcheck('linear transposed weight', function(a, m) return F.linear(a, m:t()) end, { x, leaf({ 4, 5 }, 13) })
    local only_w = leaf({ 5, 4 }, 14)
    gradcheck('linear weight only', function(m) return F.linear(rand({ 3, 4 }, 15), m) end, { only_w })
  end)

  it('explains bad shapes and dtypes', function()
    local x, w = rand({ 2, 4 }, 1), rand({ 5, 4 }, 2)
    S.assert_error(function() F.linear(rand({ 2, 3 }, 1), w) end, 'linear', '[2,3]', '3 features', '[5,4]',
      'expects 4')
    S.assert_error(function() F.linear(x, w, rand({ 4 }, 3)) end, 'linear', 'bias [4]', '[5]')
    S.assert_error(function() F.linear(x, w:float()) end, 'linear', 'float64', 'float32')
    S.assert_error(function() F.linear(x, rand({ 5, 4, 1 }, 2)) end, 'linear', 'weight must be 2-D')
    S.assert_error(function() F.linear(T.zeros(2, 4, { dtype = 'int64' }), w) end, 'linear', 'int64')
  end)
end)

-- ---- normalization ---------------------------------------------------------------------------------
describe('F.layer_norm', function()
  it('matches the reference over the trailing dims, with and without affine', function()
    local x, xv = rand_values({ 3, 4, 5 }, 20, -2, 3)
    local w, wv = rand_values({ 4, 5 }, 21)
    local b, bv = rand_values({ 4, 5 }, 22)
    S.assert_close(flat(F.layer_norm(x, { 4, 5 }, w, b)), ref_layer_norm(xv, 3, 20, wv, bv, 1e-5), 1e-10)
    S.assert_close(flat(F.layer_norm(x, 5, nil, nil, 0.1)), ref_layer_norm(xv, 12, 5, nil, nil, 0.1), 1e-10)
    S.assert_close(flat(F.layer_norm(x:float(), 5)), ref_layer_norm(xv, 12, 5, nil, nil, 1e-5), 1e-5, 1e-5)
    local h = F.layer_norm(x:half(), 5)
    assert.equal('float16', h.dtype)
    S.assert_close(flat(h:double()), ref_layer_norm(xv, 12, 5, nil, nil, 1e-5), 0.01, 0.01)
  end)

  it('differentiates x, w and b', function()
    local x = leaf({ 3, 2, 4 }, 23, -1, 1, true)
    local w, b = leaf({ 2, 4 }, 24), leaf({ 2, 4 }, 25)
    gradcheck('layer_norm', function(a, m, c) return F.layer_norm(a, { 2, 4 }, m, c) end, { x, w, b })
    gradcheck('layer_norm plain', function(a) return F.layer_norm(a, 4) end, { x })
    gradcheck('layer_norm weight only', function(m) return F.layer_norm(rand({ 6, 4 }, 26), 4, m) end,
      { leaf({ 4 }, 27) })
  end)

  it('explains bad shapes', function()
    local x = rand({ 2, 3 }, 1)
    S.assert_error(function() F.layer_norm(x, { 4 }) end, 'layer_norm', 'normalized_shape [4]', '[2,3]')
    S.assert_error(function() F.layer_norm(x, 3, rand({ 4 }, 2)) end, 'layer_norm', 'weight', '[4]', 'expected [3]')
    S.assert_error(function() F.layer_norm(x, 3, nil, nil, -1) end, 'layer_norm', 'eps')
  end)
end)

describe('F.batch_norm', function()
  local n, c, s = 4, 3, 6
  local x, xv = rand_values({ n, c, 2, 3 }, 30, -2, 3)
  local w, wv = rand_values({ c }, 31)
  local b, bv = rand_values({ c }, 32)

  it('normalizes with the batch statistics and updates the running ones (unbiased variance)', function()
    local rm, rv = T.tensor({ 0.5, -0.5, 1 }, { dtype = 'float64' }), T.tensor({ 2, 1, 0.5 }, { dtype = 'float64' })
    local rm0, rv0 = rm:totable(), rv:totable()
    local y = F.batch_norm(x, rm, rv, w, b, true, 0.2, 1e-3)
    local mean, var = channel_stats(xv, n, c, s)
    S.assert_close(flat(y), ref_batch_norm(xv, n, c, s, mean, var, wv, bv, 1e-3), 1e-10)
    local count = n * s
    for ch = 1, c do
      S.assert_close(rm:totable()[ch], 0.8 * rm0[ch] + 0.2 * mean[ch], 1e-12)
      S.assert_close(rv:totable()[ch], 0.8 * rv0[ch] + 0.2 * var[ch] * count / (count - 1), 1e-12)
    end
    -- float32 running buffers with a float16 input
    local rm32, rv32 = T.zeros(c), T.ones(c)
    F.batch_norm(x:half(), rm32, rv32, nil, nil, true)
    S.assert_close(rm32:double(), T.tensor(mean, { dtype = 'float64' }) * 0.1, 0.01, 1e-3)
  end)

  it('normalizes with the running statistics in evaluation, and without buffers in training', function()
    local rm, rv = rand({ c }, 33), rand({ c }, 34, 0.5, 2)
    local before = rm:clone()
    local y = F.batch_norm(x, rm, rv, w, b, false)
    S.assert_close(flat(y), ref_batch_norm(xv, n, c, s, flat(rm), flat(rv), wv, bv, 1e-5), 1e-10)
    S.assert_close(rm, before, 0, 0)
    local mean, var = channel_stats(xv, n, c, s)
    S.assert_close(flat(F.batch_norm(x, nil, nil, nil, nil, true)), ref_batch_norm(xv, n, c, s, mean, var,
      nil, nil, 1e-5), 1e-10)
    local x2, x2v = rand_values({ 5, 3 }, 35)
    local m2, v2 = channel_stats(x2v, 5, 3, 1)
    S.assert_close(flat(F.batch_norm(x2:float(), nil, nil, nil, nil, true)), ref_batch_norm(x2v, 5, 3, 1, m2,
      v2, nil, nil, 1e-5), 1e-5, 1e-5)
  end)

  it('differentiates x, w and b in training and in evaluation', function()
    local xl = leaf({ 3, 2, 2, 2 }, 36, -1, 1, true)
    local wl, bl = leaf({ 2 }, 37), leaf({ 2 }, 38)
    gradcheck('batch_norm train', function(a, m, o) return F.batch_norm(a, nil, nil, m, o, true) end, { xl, wl, bl })
    local rm, rv = rand({ 2 }, 39), rand({ 2 }, 40, 0.5, 2)
    gradcheck('batch_norm eval', function(a, m, o) return F.batch_norm(a, rm, rv, m, o, false) end, { xl, wl, bl })
    gradcheck('batch_norm [N, C]', function(a) return F.batch_norm(a, nil, nil, nil, nil, true) end,
      { leaf({ 4, 3 }, 41) })
  end)

  it('explains bad inputs', function()
    S.assert_error(function() F.batch_norm(x, nil, nil, w, b, false) end, 'batch_norm', 'running_mean', 'evaluation')
    S.assert_error(function() F.batch_norm(rand({ 1, 3 }, 1), nil, nil, nil, nil, true) end,
      'more than 1 value per channel', '[1,3]')
    S.assert_error(function() F.batch_norm(x, nil, nil, rand({ 4 }, 1), nil, true) end, 'batch_norm',
      'weight', '[4]', 'expected [3]')
    S.assert_error(function() F.batch_norm(rand({ 3 }, 1), nil, nil, nil, nil, true) end, 'batch_norm',
      'at least 2 dims')
    S.assert_error(function() F.batch_norm(x, T.zeros(3, { dtype = 'float64' }), nil, nil, nil, true) end, 'together')
    local rm = T.zeros(3, { dtype = 'float64' }):requires_grad_()
    S.assert_error(function() F.batch_norm(x, rm, T.ones(3, { dtype = 'float64' }), nil, nil, true) end,
      'batch_norm', 'leaf')
  end)
end)

describe('F.group_norm', function()
  it('matches the reference per sample and group, with per-channel affine', function()
    local x, xv = rand_values({ 2, 6, 3 }, 50, -2, 2)
    local w, wv = rand_values({ 6 }, 51)
    local b, bv = rand_values({ 6 }, 52)
    S.assert_close(flat(F.group_norm(x, 3, w, b)), ref_group_norm(xv, 2, 6, 3, 3, wv, bv, 1e-5), 1e-10)
    S.assert_close(flat(F.group_norm(x, 1)), ref_group_norm(xv, 2, 6, 3, 1, nil, nil, 1e-5), 1e-10)
    S.assert_close(flat(F.group_norm(x:float(), 6, w:float(), b:float())), ref_group_norm(xv, 2, 6, 3, 6, wv,
      bv, 1e-5), 1e-4, 1e-5)
  end)

  it('differentiates x, w and b', function()
    local x = leaf({ 2, 4, 2, 2 }, 53, -1, 1, true)
    gradcheck('group_norm', function(a, m, c) return F.group_norm(a, 2, m, c) end, { x, leaf({ 4 }, 54),
      leaf({ 4 }, 55) })
  end)

  it('explains bad groups', function()
    S.assert_error(function() F.group_norm(rand({ 2, 6 }, 1), 4) end, 'group_norm', '6 channels', '4 groups')
    S.assert_error(function() F.group_norm(rand({ 2, 6 }, 1), 3, rand({ 3 }, 2)) end, 'group_norm', 'weight')
  end)
end)

-- ---- softmax ---------------------------------------------------------------------------------------
describe('F.softmax and F.log_softmax', function()
  it('match the reference along every dim (contiguous rows and strided columns)', function()
    local shape = { 3, 4, 5 }
    local x, xv = rand_values(shape, 60, -3, 3)
    for _, dim in ipairs { 0, 1, 2, -1 } do
      local d = dim < 0 and dim + 3 or dim
      S.assert_close(flat(F.softmax(x, dim)), ref_softmax(xv, shape, d, false), 1e-12)
      S.assert_close(flat(x:log_softmax(dim)), ref_softmax(xv, shape, d, true), 1e-12)
    end
    local wide, wv = rand_values({ 2, 3, 130 }, 61) -- more columns than one block
    S.assert_close(flat(F.softmax(wide:float(), 1)), ref_softmax(wv, { 2, 3, 130 }, 1, false), 1e-5, 1e-7)
    S.assert_close(flat(T.softmax(S.noncontiguous(x), 2)), ref_softmax(xv, shape, 2, false), 1e-12)
  end)

  it('are stable for large logits', function()
    local x = T.tensor({ { 1000, 1001, 1002 }, { -1000, -1001, -1e30 } }, { dtype = 'float32' })
    local p = F.softmax(x, 1)
    S.assert_close(p, ref_softmax({ 1000, 1001, 1002, -1000, -1001, -1e30 }, { 2, 3 }, 1, false), 1e-6, 1e-7)
    S.assert_close(F.log_softmax(x, 1):select(0, 0), { -2.40760596, -1.40760596, -0.40760596 }, 1e-6)
    S.assert_close(F.softmax(T.tensor(5.0), 0), 1)
  end)

  it('differentiate along any dim', function()
    local x = leaf({ 2, 3, 4 }, 62, -2, 2, true)
    for _, dim in ipairs { 0, 1, 2 } do
      gradcheck('softmax', function(a) return F.softmax(a, dim) end, { x })
      gradcheck('log_softmax', function(a) return F.log_softmax(a, dim) end, { x })
    end
  end)

  it('explain bad arguments', function()
    S.assert_error(function() F.softmax(T.ones(3, { dtype = 'int64' }), 0) end, 'softmax', 'int64')
    S.assert_error(function() F.log_softmax(T.ones(3), 1) end, 'log_softmax', 'dim 1 out of range')
    S.assert_error(function() F.softmax(T.ones(3)) end, 'softmax', 'dim is required')
  end)
end)

-- ---- dropout and drop_path -------------------------------------------------------------------------
describe('F.dropout', function()
  it('returns the input itself when p = 0 or not training', function()
    local x = T.ones(4)
    assert.equal(x:data_ptr(), F.dropout(x, 0):data_ptr())
    assert.equal(x:data_ptr(), F.dropout(x, 0.5, false):data_ptr())
  end)

  it('zeroes a fraction p and scales the rest by 1/(1-p)', function()
    local n, p = 200000, 0.3
    local y = F.dropout(T.ones(n), p, true, T.Generator(1))
    local kept = y:ne(0):double():sum():item()
    assert.is_true(math.abs(kept / n - (1 - p)) < 0.005, 'kept fraction ' .. kept / n)
    S.assert_close(y:amax(), 1 / (1 - p), 1e-6)
    S.assert_close(y:sum():item() / n, 1, 0.01)
    S.assert_close(F.dropout(T.ones(5), 1), { 0, 0, 0, 0, 0 })
  end)

  it('is deterministic per seed and draws the mask as bernoulli_(1 - p) does', function()
    local x = T.ones(1000, { dtype = 'float64' })
    local a = F.dropout(x, 0.4, true, T.Generator(7))
    local b = F.dropout(x, 0.4, true, T.Generator(7))
    local c = F.dropout(x, 0.4, true, T.Generator(8))
    S.assert_close(a, b, 0, 0)
    assert.is_true(a:ne(c):any():item())
    local keep = T.empty(1000, { dtype = 'bool' }):bernoulli_(0.6, T.Generator(7))
    S.assert_close(a:ne(0), keep)
    T.manual_seed(3)
    local d = F.dropout(x, 0.4)
    T.manual_seed(3)
    S.assert_close(F.dropout(x, 0.4), d, 0, 0)
  end)

  it('passes gradients through the kept elements only', function()
    local x = leaf({ 3, 4 }, 70, -1, 1, true)
    local g = T.Generator(0)
    gradcheck('dropout', function(a)
      g:manual_seed(11) -- the same mask at every evaluation
      return F.dropout(a, 0.5, true, g)
    end, { x })
    local h = leaf({ 50 }, 71)
    local y = F.dropout(h, 0.5, true, T.Generator(2))
    y:sum():backward()
    S.assert_close(h.grad, y:detach():ne(0):double() * 2)
    assert.equal('float32', F.dropout(T.ones(3, { dtype = 'float16' }):float(), 0.5).dtype)
    assert.equal('float16', F.dropout(T.ones(3, { dtype = 'float16' }), 0.5).dtype)
  end)

  it('explains bad arguments', function()
    S.assert_error(function() F.dropout(T.ones(3), 1.5) end, 'dropout', 'p must be in [0, 1]', '1.5')
    S.assert_error(function() F.dropout(T.ones(3), 0.5, 1) end, 'dropout', 'training must be a boolean')
    S.assert_error(function() F.dropout(T.ones(3), 0.5, true, 42) end, 'dropout', 'Generator')
    S.assert_error(function() F.dropout(T.ones(3, { dtype = 'int64' }), 0.5) end, 'dropout', 'int64')
    S.assert_error(function() T.nn.Dropout(2) end, 'Dropout: p must be in [0, 1], got 2')
    S.assert_error(function() T.nn.DropPath(0 / 0) end, 'DropPath: p must be in [0, 1], got nan')
  end)
end)

describe('F.drop_path', function()
  it('drops whole samples and scales the kept ones by 1/keep', function()
    local x = T.ones(400, 3, 2)
    local y = F.drop_path(x, 0.25, true, true, T.Generator(5))
    local per_sample = y:amax({ 1, 2 })
    S.assert_close(per_sample, y:amin({ 1, 2 }), 0, 0) -- each sample all dropped or all kept
    local kept = per_sample:ne(0):double():sum():item()
    assert.is_true(math.abs(kept / 400 - 0.75) < 0.07, 'kept fraction ' .. kept / 400)
    S.assert_close(per_sample:amax(), 1 / 0.75, 1e-6)
    local unscaled = F.drop_path(x, 0.25, true, false, T.Generator(5))
    S.assert_close(unscaled * (1 / 0.75), y, 1e-6)
    assert.equal(x:data_ptr(), F.drop_path(x, 0.25):data_ptr()) -- timm's default: training = false
    assert.equal(x:data_ptr(), F.drop_path(x, 0, true):data_ptr())
  end)

  it('differentiates through the kept samples', function()
    local x = leaf({ 4, 3 }, 72, -1, 1, true)
    local g = T.Generator(0)
    gradcheck('drop_path', function(a)
      g:manual_seed(3)
      return F.drop_path(a, 0.5, true, true, g)
    end, { x })
  end)

  it('explains bad arguments', function()
    S.assert_error(function() F.drop_path(T.tensor(1.0), 0.5, true) end, 'drop_path', '0-d')
    S.assert_error(function() F.drop_path(T.ones(2), -0.1, true) end, 'drop_path', 'p must be in [0, 1]')
  end)
end)

-- ---- cross entropy ---------------------------------------------------------------------------------
describe('F.cross_entropy', function()
  local n, c = 5, 4
  local z, zv = rand_values({ n, c }, 80, -2, 2)
  local targets = { 2, 0, 3, -100, 1 }
  local t = int64(targets)

  it('matches PyTorch for class indices: mean, sum, none, ignore_index, weights, smoothing', function()
    local w, wv = rand_values({ c }, 81, 0.2, 2)
    local cases = {
      {},
      { reduction = 'sum' },
      { reduction = 'none' },
      { weight = w },
      { label_smoothing = 0.2 },
      { weight = w, label_smoothing = 0.3, reduction = 'mean' },
      { weight = w, label_smoothing = 0.1, reduction = 'none' },
      { ignore_index = 3, label_smoothing = 0.05 },
    }
    for i, o in ipairs(cases) do
      local ref_opts = { weight = o.weight and wv, label_smoothing = o.label_smoothing,
        ignore_index = o.ignore_index }
      local tv = {}
      for k, v in ipairs(targets) do tv[k] = (v == -100 and o.ignore_index) and 1 or v end
      local losses, total = ref_cross_entropy(zv, n, c, 1, tv, false, ref_opts)
      local y = F.cross_entropy(z, int64(tv), o)
      S.assert_close(flat(y), S.flatten({ reduce(losses, o.reduction or 'mean', total) }), 1e-12, 1e-12, 'case ' .. i)
    end
  end)

  it('handles spatial dims, unbatched input and probability targets', function()
    local zs, zsv = rand_values({ 2, 3, 2, 2 }, 82, -2, 2)
    local ts = { 0, 2, 1, 1, 2, -100, 0, 1 }
    local losses, total = ref_cross_entropy(zsv, 2, 3, 4, ts, false, { label_smoothing = 0.1 })
    local y = F.cross_entropy(zs, int64(ts, { 2, 2, 2 }), { reduction = 'none', label_smoothing = 0.1 })
    assert.same({ 2, 2, 2 }, y.shape)
    S.assert_close(flat(y), losses, 1e-12)
    S.assert_close(F.cross_entropy(zs, int64(ts, { 2, 2, 2 }), { label_smoothing = 0.1 }):item(),
      reduce(losses, 'mean', total), 1e-12)
    local one = F.cross_entropy(z:select(0, 0), int64({ 2 }, {}):squeeze())
    assert.same({}, one.shape)
    S.assert_close(one:item(), ref_cross_entropy(zv, 1, c, 1, { 2 }, false, {})[1], 1e-12)
    -- probabilities, smoothed and weighted
    local p, pv = rand_values({ 2, 3, 2, 2 }, 83, 0, 1)
    local w, wv = rand_values({ 3 }, 84, 0.5, 1.5)
    local sl = ref_cross_entropy(zsv, 2, 3, 4, pv, true, { weight = wv, label_smoothing = 0.2 })
    S.assert_close(F.cross_entropy(zs, p, { weight = w, label_smoothing = 0.2 }):item(), reduce(sl, 'mean'), 1e-12)
    S.assert_close(flat(F.cross_entropy(zs:float(), p:float(), { reduction = 'none', weight = w:float(),
      label_smoothing = 0.2 })), sl, 1e-5, 1e-6)
  end)

  it('gives nan for a mean over only ignored targets, as PyTorch', function()
    local y = F.cross_entropy(z, int64({ -100, -100, -100, -100, -100 }))
    assert.is_true(y:item() ~= y:item())
    S.assert_close(F.cross_entropy(z, int64({ -100, -100, -100, -100, -100 }), { reduction = 'sum' }), 0)
  end)

  it('differentiates the logits and probability targets', function()
    local zl = leaf({ 5, 4 }, 85, -2, 2, true)
    local w = rand({ 4 }, 86, 0.2, 2)
    gradcheck('ce mean', function(a) return F.cross_entropy(a, t) end, { zl })
    gradcheck('ce weighted smoothed', function(a) return F.cross_entropy(a, t, { weight = w,
      label_smoothing = 0.2 }) end, { zl })
    gradcheck('ce none', function(a) return F.cross_entropy(a, t, { reduction = 'none',
      label_smoothing = 0.1 }) end, { zl })
    local zs = leaf({ 2, 3, 2, 2 }, 87, -2, 2)
    local ts = int64({ 0, 2, 1, 1, 2, -100, 0, 1 }, { 2, 2, 2 })
    gradcheck('ce spatial sum', function(a) return F.cross_entropy(a, ts, { reduction = 'sum',
      weight = w:narrow(0, 0, 3) }) end, { zs })
    local p = leaf({ 2, 3, 2, 2 }, 88, 0, 1)
    gradcheck('ce probabilities', function(a, q) return F.cross_entropy(a, q, { label_smoothing = 0.1,
      weight = w:narrow(0, 0, 3) }) end, { zs, p })
    gradcheck('ce unbatched', function(a) return F.cross_entropy(a, int64({ 1 }, {}):squeeze()) end,
      { leaf({ 4 }, 89) })
  end)

  it('explains bad targets and options', function()
    S.assert_error(function() F.cross_entropy(z, int64({ 0, 1, 4, 0, 0 })) end, 'cross_entropy', 'target 4',
      '4 classes')
    S.assert_error(function() F.cross_entropy(z, int64({ 0, -1, 0, 0, 0 })) end, 'target -1', '4 classes')
    S.assert_error(function() F.cross_entropy(z, T.tensor({ 0, 1, 2, 3, 0 }, { dtype = 'int32' })) end,
      'cross_entropy', 'int64', 'int32')
    S.assert_error(function() F.cross_entropy(z, int64({ 0, 1, 2 })) end, 'cross_entropy', '[3]', '[5,4]',
      'expected [5]')
    S.assert_error(function() F.cross_entropy(z, rand({ 5, 3 }, 1)) end, 'cross_entropy', 'probability', '[5,3]')
    S.assert_error(function() F.cross_entropy(z, t, { weight = rand({ 3 }, 1) }) end, 'cross_entropy',
      'weight', '[3]', 'expected [4]')
    S.assert_error(function() F.cross_entropy(z, t, { reduction = 'avg' }) end, 'cross_entropy',
      "'none', 'mean' or 'sum'", 'avg')
    S.assert_error(function() F.cross_entropy(z, t, { smoothing = 0.1 }) end, "unknown option 'smoothing'",
      'ignore_index, label_smoothing, reduction, weight')
    S.assert_error(function() F.cross_entropy(z, t, { label_smoothing = 1.5 }) end,
      'cross_entropy: label_smoothing must be in [0, 1], got 1.5')
    S.assert_error(function() F.cross_entropy(z, t, { label_smoothing = 1.5 }) end, 'label_smoothing', '[0, 1]')
  end)
end)

-- ---- regression losses -----------------------------------------------------------------------------
describe('F.mse_loss, F.l1_loss, F.smooth_l1_loss', function()
  local function ref_pointwise(kind, d, beta)
    if kind == 'mse' then return d * d end
    if kind == 'l1' then return math.abs(d) end
    if math.abs(d) < beta then return 0.5 * d * d / beta end
    return math.abs(d) - 0.5 * beta
  end

  local a, av = rand_values({ 3, 4 }, 90, -2, 2)
  local b, bv = rand_values({ 1, 4 }, 91, -2, 2) -- broadcast over the rows
  local function diffs()
    local d = {}
    for i = 0, 2 do for j = 1, 4 do d[#d + 1] = av[i * 4 + j] - bv[j] end end
    return d
  end

  it('match the references for every reduction, with broadcasting', function()
    local fns = { mse = F.mse_loss, l1 = F.l1_loss, smooth = F.smooth_l1_loss }
    for kind, fn in each(fns) do
      local opts = kind == 'smooth' and { beta = 0.7 } or {}
      local values = {}
      for k, d in ipairs(diffs()) do values[k] = ref_pointwise(kind, d, 0.7) end
      for _, r in ipairs { 'none', 'mean', 'sum' } do
        opts.reduction = r
        S.assert_close(flat(fn(a, b, opts)), S.flatten({ reduce(values, r) }), 1e-12, 1e-12, kind .. ' ' .. r)
      end
      S.assert_close(fn(a:float(), b:float(), { reduction = 'sum', beta = opts.beta }):item(), reduce(values,
        'sum'), 1e-5)
    end
    S.assert_close(F.smooth_l1_loss(a, b, { beta = 0 }), F.l1_loss(a, b), 1e-15)
    local big = T.ones(100000) -- the chunked parallel sum
    S.assert_close(F.mse_loss(big * 3, big):item(), 4, 1e-6)
    assert.equal('float64', F.mse_loss(a:float(), a).dtype)
  end)

  it('differentiate both inputs (away from the kinks)', function()
    local x = leaf({ 3, 4 }, 92, -2, 2, true)
    local y = leaf({ 4 }, 93, 3, 4) -- |x - y| >= 1 > beta: no kink within reach
    local near = leaf({ 3, 4 }, 94, -0.2, 0.2)
    for _, r in ipairs { 'none', 'mean', 'sum' } do
      gradcheck('mse ' .. r, function(p, q) return F.mse_loss(p, q, { reduction = r }) end, { x, y })
      gradcheck('l1 ' .. r, function(p, q) return F.l1_loss(p, q, { reduction = r }) end, { x, y })
      gradcheck('smooth_l1 ' .. r, function(p, q) return F.smooth_l1_loss(p, q, { reduction = r }) end, { x, y })
    end
    -- within beta the smooth branch is quadratic
    gradcheck('smooth_l1 quadratic', function(p) return F.smooth_l1_loss(p, T.zeros(3, 4,
      { dtype = 'float64' }), { beta = 0.5 }) end, { near })
  end)

  it('explain bad arguments', function()
    S.assert_error(function() F.mse_loss(a, rand({ 5 }, 1)) end, 'mse_loss', '[3,4]', '[5]')
    S.assert_error(function() F.l1_loss(a, T.zeros(3, 4, { dtype = 'int64' })) end, 'l1_loss', 'int64')
    S.assert_error(function() F.smooth_l1_loss(a, b, { beta = -1 }) end, 'smooth_l1_loss', 'beta')
    S.assert_error(function() F.mse_loss(a, b, { reduction = 'avg' }) end, 'mse_loss', 'avg')
    S.assert_error(function() F.mse_loss(a, b, { reduce = true }) end, "unknown option 'reduce'", 'valid: reduction')
  end)
end)

-- ---- sizes that split across threads ---------------------------------------------------------------
describe('large inputs', function()
  -- The op in float32 against the same op in float64 (checked above against the references), with
  -- the gradients of every input, and the float32 results identical for 1 and 2 threads.
  local function agree(name, fn, shapes, rtol, blas)
    local function run(dtype)
      local inputs = {}
      for i, shape in ipairs(shapes) do
        inputs[i] = T.rand(shape, { dtype = dtype, generator = T.Generator(i) }):mul(4):sub(2):requires_grad_()
      end
      local out = fn(unpack(inputs))
      out:backward(T.ones_like(out))
      local results = { out:detach() }
      for i, x in ipairs(inputs) do results[i + 1] = x.grad end
      return results
    end
    local previous = T.get_num_threads()
    local f64, f32 = run('float64'), run('float32')
    T.set_num_threads(1)
    local serial = run('float32')
    T.set_num_threads(previous)
    for i = 1, #f64 do
      S.assert_close(f32[i]:double(), f64[i], rtol, rtol, name .. ' result ' .. i)
      -- our kernels combine partial sums in a fixed order; BLAS may not across thread counts
      S.assert_close(serial[i], f32[i], blas and 1e-4 or 0, blas and 1e-5 or 0, name .. ' threads ' .. i)
    end
  end

  it('agree across dtypes and thread counts', function()
    agree('linear', F.linear, { { 300, 64 }, { 48, 64 }, { 48 } }, 1e-4, true)
    agree('layer_norm', function(x, w, b) return F.layer_norm(x, 96, w, b) end, { { 700, 96 }, { 96 }, { 96 } }, 1e-3)
    agree('batch_norm', function(x, w, b) return F.batch_norm(x, nil, nil, w, b, true) end, { { 6, 8, 40,
      40 }, { 8 }, { 8 } }, 1e-3)
    agree('group_norm', function(x, w, b) return F.group_norm(x, 4, w, b) end, { { 3, 8, 40, 40 }, { 8 },
      { 8 } }, 1e-3)
    agree('softmax rows', function(x) return F.softmax(x, 1) end, { { 900, 70 } }, 1e-4)
    agree('log_softmax columns', function(x) return F.log_softmax(x, 0) end, { { 300, 230 } }, 1e-4)
    local t = T.randint(0, 10, { 4000 }, { generator = T.Generator(9) })
    agree('cross_entropy', function(z) return F.cross_entropy(z, t, { label_smoothing = 0.1 }) end, { { 4000,
      10 } }, 1e-4)
    agree('mse_loss', F.mse_loss, { { 300, 400 }, { 300, 400 } }, 1e-5)
  end)
end)

describe('activation aliases', function()
  it('are the elementwise ops', function()
    local x = rand({ 5 }, 95, -2, 2)
    for _, name in ipairs { 'relu', 'gelu', 'silu', 'sigmoid', 'tanh' } do
      S.assert_close(F[name](x), x[name](x), 0, 0)
    end
    S.assert_error(function() F.gelu(x, { approximate = 'tanh' }) end, 'gelu', 'tanh')
  end)
end)
