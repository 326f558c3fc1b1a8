-- attention_spec.lua — T.F.scaled_dot_product_attention (the fused ts_attention op): forward
-- against a composite of existing ops (matmul, amax, exp, sum), gradients against that composite's
-- autograd and against float64 central differences (T.gradcheck), masking, bias broadcasting,
-- dtypes, and the error messages; then the fused Swin position bias (T.F.relative_position_bias).
local T = require 'tessera'
local S = require 'support'

local sdpa = T.F.scaled_dot_product_attention

local numel = S.numel

-- A float64 tensor of random values in [lo, hi).
local function rand(shape, seed, lo, hi)
  return T.tensor(S.nest(S.randoms(numel(shape), seed, lo or -1, hi or 1), shape), { dtype = 'float64' })
end

local function leaf(shape, seed, lo, hi) return rand(shape, seed, lo, hi):requires_grad_() end

-- softmax(q kᵀ scale + bias) v written with existing ops; bias broadcasts by the usual rules.
local function composite(q, k, v, bias, scale)
  scale = scale or 1 / math.sqrt(q:size(-1))
  local s = q:matmul(k:transpose(-2, -1)) * scale
  if bias then s = s + bias end
  local m = s:detach():amax(-1, true)
  local e = (s - m):exp()
  return (e / e:sum(-1, true)):matmul(v)
end

local function grads_of(inputs)
  local out = {}
  for i, x in ipairs(inputs) do out[i] = x.grad; x.grad = nil end
  return out
end

-- Runs fused and composite forward and backward on the same leaves; compares outputs and grads.
local function compare_with_composite(inputs, fused, reference, tol)
  local out = fused(unpack(inputs))
  local w = rand(out.shape, 99, 0.5, 1.5)
  ;(out * w):sum():backward()
  local g1 = grads_of(inputs)
  local ref = reference(unpack(inputs))
  ;(ref * w):sum():backward()
  local g2 = grads_of(inputs)
  S.assert_close(out, ref:detach(), tol, tol, 'output')
  for i = 1, #inputs do
    if inputs[i].requires_grad then S.assert_close(g1[i], g2[i], tol, tol, 'gradient of input ' .. i) end
  end
end

local function check_grad(name, fn, inputs)
  assert(T.gradcheck(fn, inputs, { name = name }))
end

describe('scaled_dot_product_attention forward', function()
  it('matches the composite for ViT-shaped inputs (B2 H3 N17 D8)', function()
    local q, k, v = rand({ 2, 3, 17, 8 }, 1), rand({ 2, 3, 17, 8 }, 2), rand({ 2, 3, 17, 8 }, 3)
    S.assert_close(sdpa(q, k, v), composite(q, k, v), 1e-12, 1e-13)
    S.assert_close(sdpa(q, k, v, { scale = 0.3 }), composite(q, k, v, nil, 0.3), 1e-12, 1e-13)
  end)

  it('handles cross attention (Nq ~= Nk, Dv ~= D) and a bias broadcast over the batch', function()
    local q, k, v = rand({ 2, 2, 5, 6 }, 4), rand({ 2, 2, 9, 6 }, 5), rand({ 2, 2, 9, 3 }, 6)
    local bias = rand({ 2, 5, 9 }, 7, -2, 2)
    local out = sdpa(q, k, v, { bias = bias })
    assert.same({ 2, 2, 5, 3 }, out.shape)
    S.assert_close(out, composite(q, k, v, bias), 1e-12, 1e-13)
  end)

  it('takes Swin window biases: [H, N, N] relative bias plus a [nW, 1, N, N] -100 shift mask', function()
    local B, nW, H, N, D = 2, 4, 3, 9, 4
    local q, k, v = rand({ B, nW, H, N, D }, 8), rand({ B, nW, H, N, D }, 9), rand({ B, nW, H, N, D }, 10)
    local rel = rand({ H, N, N }, 11, -1, 1)
    local labels = rand({ nW, N }, 12, 0, 3):floor()
    local mask = T.where(labels:unsqueeze(1):ne(labels:unsqueeze(2)), -100.0, 0.0):to('float64'):unsqueeze(1)
    local bias = rel + mask -- [nW, H, N, N], broadcast over the images
    S.assert_close(sdpa(q, k, v, { bias = bias }), composite(q, k, v, bias), 1e-12, 1e-13)
    -- the mask alone, broadcast over images and heads
    S.assert_close(sdpa(q, k, v, { bias = mask }), composite(q, k, v, mask), 1e-12, 1e-13)
    -- the models' layout: windows and heads merged [B, nW * H, N, D] against [1 or B, nW * H, N, N]
    local function merged(t) return t:reshape(B, nW * H, N, D) end
    local per_image = rand({ B, nW, H, N, N }, 13, -1, 1) + mask
    S.assert_close(sdpa(merged(q), merged(k), merged(v), { bias = per_image:reshape(B, nW * H, N, N) }),
      merged(composite(q, k, v, per_image)), 1e-12, 1e-13)
    S.assert_close(sdpa(merged(q), merged(k), merged(v), { bias = bias:reshape(1, nW * H, N, N) }),
      merged(composite(q, k, v, bias)), 1e-12, 1e-13)
  end)

  it('accepts 3-D and 2-D inputs, broadcast batch dims of k and v, and strided views', function()
    local q, k, v = rand({ 4, 6, 5 }, 13), rand({ 4, 7, 5 }, 14), rand({ 4, 7, 2 }, 15)
    S.assert_close(sdpa(q, k, v), composite(q, k, v), 1e-12, 1e-13)
    S.assert_close(sdpa(q[1], k[1], v[1]), composite(q[1], k[1], v[1]), 1e-12, 1e-13)
    local kb, vb = rand({ 1, 7, 5 }, 16), rand({ 7, 2 }, 17) -- shared keys (multi-query style)
    S.assert_close(sdpa(q, kb, vb), composite(q, kb:expand(4, 7, 5), vb:expand(4, 7, 2)), 1e-12, 1e-13)
    local qt = rand({ 4, 5, 6 }, 18):transpose(1, 2) -- [4, 6, 5], non-contiguous
    local bias = S.noncontiguous(rand({ 6, 7 }, 19))
    S.assert_close(sdpa(qt, S.noncontiguous(k), v, bias), composite(qt, k, v, bias), 1e-12, 1e-13)
  end)

  it('matches the composite across several query tiles per head', function()
    -- Nk * D large enough that a head's queries are split into tiles of 16 rows
    local q, k, v = rand({ 1, 2, 40, 256 }, 20), rand({ 1, 2, 1100, 256 }, 21), rand({ 1, 2, 1100, 8 }, 22)
    local bias = rand({ 40, 1100 }, 23, -3, 3)
    S.assert_close(sdpa(q, k, v, { bias = bias }), composite(q, k, v, bias), 1e-11, 1e-12)
  end)

  it('computes float16, bfloat16 and float32 inputs in float32', function()
    local q, k, v = rand({ 2, 2, 7, 8 }, 24), rand({ 2, 2, 7, 8 }, 25), rand({ 2, 2, 7, 8 }, 26)
    local bias = rand({ 7, 7 }, 27)
    local expected = composite(q, k, v, bias)
    local out32 = sdpa(q:to('float32'), k:to('float32'), v:to('float32'), { bias = bias:to('float32') })
    assert.equal('float32', out32.dtype)
    S.assert_close(out32, expected, 1e-5, 1e-6)
    for _, dt in ipairs { 'float16', 'bfloat16' } do
      local out = sdpa(q:to(dt), k:to(dt), v:to(dt), { bias = bias }) -- a float64 bias is converted
      assert.equal(dt, out.dtype)
      S.assert_close(out:to('float64'), composite(q:to(dt):to('float64'), k:to(dt):to('float64'),
        v:to(dt):to('float64'), bias), 2e-2, 2e-2)
    end
  end)
end)

describe('scaled_dot_product_attention masking', function()
  it('gives zeros, not NaN, for fully masked rows, and zero gradients through them', function()
    local q, k, v = leaf({ 1, 2, 3, 4 }, 30), leaf({ 1, 2, 5, 4 }, 31), leaf({ 1, 2, 5, 3 }, 32)
    local bias = T.zeros({ 2, 3, 5 }, { dtype = 'float64' })
    bias[{ 0, 1 }]:fill_(-math.huge)           -- head 0, query 1: every key masked
    bias[{ 1, 2, { 0, 3 } }]:fill_(-math.huge) -- head 1, query 2: keys 0..2 masked
    local out = sdpa(q, k, v, { bias = bias })
    S.assert_close(out[{ 0, 0, 1 }], T.zeros({ 3 }, { dtype = 'float64' }), 0, 0)
    -- the partly masked row attends to keys 3 and 4 only
    local kept = composite(q:detach()[{ 0, 1, { 2, 3 } }], k:detach()[{ 0, 1, { 3, 5 } }], v:detach()[{ 0, 1, { 3, 5 } }])
    S.assert_close(out[{ 0, 1, 2 }], kept[0], 1e-12, 1e-13)
    out:sum():backward()
    for _, x in ipairs { q.grad, k.grad, v.grad } do
      assert.is_true(x:isfinite():all():item())
    end
    S.assert_close(q.grad[{ 0, 0, 1 }], T.zeros({ 4 }, { dtype = 'float64' }), 0, 0)
    check_grad('masked rows', function(a, b, c) return sdpa(a, b, c, { bias = bias }) end, { q, k, v })
  end)

  it('propagates NaN instead of masking it', function()
    local q, k, v = rand({ 3, 4 }, 44), rand({ 5, 4 }, 45), rand({ 5, 2 }, 46)
    q[1][2] = 0 / 0
    local out = sdpa(q, k, v)
    assert.is_true(out[1]:isnan():all():item())
    assert.is_true(out[0]:isfinite():all():item() and out[2]:isfinite():all():item())
    local bias = T.full({ 3, 5 }, -math.huge, { dtype = 'float64' })
    bias[0][3] = 0 / 0 -- NaN in an otherwise fully masked row: NaN, not zeros
    out = sdpa(rand({ 3, 4 }, 47), k, v, { bias = bias })
    assert.is_true(out[0]:isnan():all():item())
    S.assert_close(out[1], T.zeros({ 2 }, { dtype = 'float64' }), 0, 0)
  end)

  it('turns a boolean attn_mask (true = keep) into a 0 / -inf bias', function()
    local q, k, v = rand({ 2, 4, 3 }, 33), rand({ 2, 6, 3 }, 34), rand({ 2, 6, 2 }, 35)
    local keep = rand({ 4, 6 }, 36):gt(-0.3)
    keep[2]:fill_(false) -- a fully masked row
    local bias = T.where(keep, 0.0, -math.huge):to('float64')
    local out = sdpa(q, k, v, keep)
    S.assert_close(out, sdpa(q, k, v, { bias = bias }), 0, 0)
    S.assert_close(out[{ {}, 2 }], T.zeros({ 2, 2 }, { dtype = 'float64' }), 0, 0)
    S.assert_close(sdpa(q, k, v, { attn_mask = bias }), out, 0, 0) -- a float attn_mask is a bias
  end)

  it('is_causal keeps key j for query i when j <= i', function()
    local q, k, v = rand({ 2, 5, 3 }, 37), rand({ 2, 5, 3 }, 38), rand({ 2, 5, 4 }, 39)
    local keep = T.arange(5):view(5, 1):ge(T.arange(5):view(1, 5))
    local bias = T.where(keep, 0.0, -math.huge):to('float64')
    S.assert_close(sdpa(q, k, v, { is_causal = true }), composite(q, k, v, bias), 1e-12, 1e-13)
  end)

  it('treats a -100 Swin mask as a soft mask and follows large scores stably', function()
    local q, k, v = rand({ 1, 3, 4 }, 40, -30, 30), rand({ 1, 5, 4 }, 41, -30, 30), rand({ 1, 5, 2 }, 42)
    local bias = T.where(rand({ 3, 5 }, 43):gt(0), -100.0, 0.0):to('float64')
    local out = sdpa(q, k, v, { bias = bias, scale = 1 })
    assert.is_true(out:isfinite():all():item())
    S.assert_close(out, composite(q, k, v, bias, 1), 1e-10, 1e-12)
  end)
end)

describe('scaled_dot_product_attention gradients', function()
  it('passes gradcheck for q, k, v and a per-head bias', function()
    local q, k, v = leaf({ 2, 2, 3, 4 }, 50), leaf({ 2, 2, 5, 4 }, 51), leaf({ 2, 2, 5, 3 }, 52)
    local bias = leaf({ 2, 3, 5 }, 53)
    check_grad('sdpa', function(a, b, c, d) return sdpa(a, b, c, { bias = d }) end, { q, k, v, bias })
  end)

  it('passes gradcheck for a window mask [nW, 1, N, N] and a key-padding bias [B, 1, 1, Nk]', function()
    local q, k, v = leaf({ 2, 2, 2, 3, 2 }, 54), leaf({ 2, 2, 2, 3, 2 }, 55), leaf({ 2, 2, 2, 3, 2 }, 56)
    local windows = leaf({ 2, 1, 3, 3 }, 57) -- [nW, 1, N, N] against scores [B, nW, H, N, N]
    check_grad('sdpa window bias', function(a, b, c, d) return sdpa(a, b, c, { bias = d }) end, { q, k, v, windows })
    local pad = leaf({ 2, 1, 1, 1, 3 }, 58)
    check_grad('sdpa padding bias', function(a, b, c, d) return sdpa(a, b, c, { bias = d, scale = 0.7 }) end,
      { q, k, v, pad })
  end)

  it('passes gradcheck on non-contiguous inputs and a full [B, H, Nq, Nk] bias', function()
    local q = leaf({ 4, 2, 3, 2 }, 59)
    local k = S.noncontiguous(rand({ 4, 2, 4, 2 }, 60)):requires_grad_()
    local v = rand({ 4, 2, 3, 4 }, 61):transpose(-2, -1):requires_grad_() -- [4, 2, 4, 3]
    local bias = leaf({ 4, 2, 3, 4 }, 62) -- 8 bias blocks: one per head
    check_grad('sdpa strided', function(a, b, c, d) return sdpa(a, b, c, { bias = d }) end, { q, k, v, bias })
  end)

  it('passes gradcheck with k and v broadcast over the batch (shared keys)', function()
    local q, k, v = leaf({ 2, 3, 3, 2 }, 67), leaf({ 1, 3, 4, 2 }, 68), leaf({ 4, 3 }, 69)
    check_grad('sdpa shared keys', function(a, b, c) return sdpa(a, b, c) end, { q, k, v })
  end)

  it('gives gradients only to the inputs that require them', function()
    local q, k, v = rand({ 2, 3, 4 }, 63), leaf({ 2, 5, 4 }, 64), rand({ 2, 5, 3 }, 65)
    local bias = leaf({ 3, 5 }, 66)
    local out = sdpa(q, k, v, { bias = bias })
    assert.equal('scaled_dot_product_attention', out.grad_fn)
    out:sum():backward()
    assert.is_nil(q.grad)
    assert.is_nil(v.grad)
    assert.same({ 2, 5, 4 }, k.grad.shape)
    assert.same({ 3, 5 }, bias.grad.shape)
    check_grad('sdpa bias only', function(b) return sdpa(q, k:detach(), v, { bias = b }) end, { bias })
  end)

  it('matches the composite gradients on larger shapes, tiled queries and float32', function()
    local function leaves(dtype, seed, shapes)
      local out = {}
      for i, s in ipairs(shapes) do out[i] = rand(s, seed + i):to(dtype):requires_grad_() end
      return out
    end
    local fused = function(a, b, c, d) return sdpa(a, b, c, { bias = d }) end
    local inputs = leaves('float64', 70, { { 2, 3, 17, 8 }, { 2, 3, 17, 8 }, { 2, 3, 17, 8 }, { 3, 17, 17 } })
    compare_with_composite(inputs, fused, composite, 1e-11)
    inputs = leaves('float64', 75, { { 1, 1, 40, 200 }, { 1, 1, 1400, 200 }, { 1, 1, 1400, 5 }, { 1, 1400 } })
    compare_with_composite(inputs, fused, composite, 1e-10)
    inputs = leaves('float32', 80, { { 2, 2, 9, 4 }, { 2, 2, 11, 4 }, { 2, 2, 11, 6 }, { 1, 1, 9, 11 } })
    compare_with_composite(inputs, fused, composite, 1e-5)
  end)

  it('notices an output modified in place before backward', function()
    local q, k, v = leaf({ 2, 3, 4 }, 90), leaf({ 2, 3, 4 }, 91), leaf({ 2, 3, 4 }, 92)
    local out = sdpa(q, k, v)
    T.no_grad(function() out:add_(1) end)
    S.assert_error(function() out:sum():backward() end, 'modified by an in-place operation')
  end)
end)

describe('scaled_dot_product_attention errors', function()
  local q, k, v = rand({ 2, 3, 4, 8 }, 100), rand({ 2, 3, 5, 8 }, 101), rand({ 2, 3, 5, 6 }, 102)

  it('names mismatched embedding sizes and key counts', function()
    S.assert_error(function() sdpa(q, rand({ 2, 3, 5, 7 }, 103), v) end,
      'scaled_dot_product_attention', 'same last dim', '[2,3,4,8]', '[2,3,5,7]')
    S.assert_error(function() sdpa(q, k, rand({ 2, 3, 6, 6 }, 104)) end, 'number of keys', '[2,3,6,6]')
    S.assert_error(function() sdpa(q, rand({ 3, 3, 5, 8 }, 105), v) end, 'batch dims', 'do not broadcast')
    S.assert_error(function() sdpa(rand({ 8 }, 106), k, v) end, 'at least 2 dims')
  end)

  it('names a bias that does not broadcast to the scores', function()
    S.assert_error(function() sdpa(q, k, v, { bias = rand({ 4, 4 }, 107) }) end,
      'bias [4,4] is not broadcastable to the attention scores [2,3,4,5]', 'number of keys')
    S.assert_error(function() sdpa(q, k, v, { bias = rand({ 2, 5 }, 108) }) end, 'number of queries')
    S.assert_error(function() sdpa(q, k, v, { bias = rand({ 2, 2, 4, 5 }, 109) }) end,
      'bias [2,2,4,5] is not broadcastable to the attention scores [2,3,4,5]', "equal the scores' dim or be 1")
    S.assert_error(function() sdpa(q, k, v, { bias = rand({ 2, 1, 1, 4, 5 }, 110) }) end, 'more batch dims')
    -- no tiling of merged dims: a [nW, 1, N, N] mask against [B * nW, H, N, N] scores is refused
    local qm, km, vm = rand({ 6, 3, 4, 8 }, 112), rand({ 6, 3, 5, 8 }, 113), rand({ 6, 3, 5, 6 }, 114)
    S.assert_error(function() sdpa(qm, km, vm, { bias = rand({ 3, 1, 4, 5 }, 115) }) end,
      'bias [3,1,4,5] is not broadcastable to the attention scores [6,3,4,5]')
  end)

  it('names bad dtypes and options', function()
    S.assert_error(function() sdpa(q, k:to('float32'), v) end, 'one floating dtype', 'float64, float32')
    S.assert_error(function() sdpa(q:to('int64'), k:to('int64'), v:to('int64')) end, 'one floating dtype')
    S.assert_error(function() sdpa(q, k, v, { bias = T.zeros({ 4, 5 }, { dtype = 'int32' }) }) end,
      'floating bias or a boolean keep-mask', 'int32')
    S.assert_error(function() sdpa(q, k, v, { mask = q }) end, "unknown option 'mask'", 'attn_mask')
    S.assert_error(function() sdpa(q, k, v, { dropout_p = 0.1 }) end, 'dropout_p')
    S.assert_error(function() sdpa(q, k, v, { is_causal = true, bias = rand({ 4, 5 }, 111) }) end, 'is_causal')
    S.assert_error(function() sdpa(q, k, v, { bias = q, attn_mask = q }) end, 'not both')
  end)
end)

-- ---- the fused Swin position bias ------------------------------------------------------------------
local rpb = T.F.relative_position_bias

-- Plain Lua, float64:
--   out[w][h][i][j] = b2[h] + Σ_p w2[h][p] relu(b1[p] + Σ_c w1[p][c] f(pos[w][c][j] - pos[w][c][i])).
local function position_bias_reference(pos, w1, b1, w2, b2)
  local P, C, H = #w1, #w1[1], #w2
  local function f(d) return d == 0 and 0 or (d > 0 and 1 or -1) * math.log(1 + math.abs(d)) end
  local out = {}
  for w, coords in ipairs(pos) do
    local N = #coords[1]
    out[w] = {}
    for h = 1, H do
      out[w][h] = {}
      for i = 1, N do
        out[w][h][i] = {}
        for j = 1, N do
          local sum = b2 and b2[h] or 0
          for p = 1, P do
            local a = b1 and b1[p] or 0
            for c = 1, C do a = a + w1[p][c] * f(coords[c][j] - coords[c][i]) end
            sum = sum + w2[h][p] * math.max(a, 0)
          end
          out[w][h][i][j] = sum
        end
      end
    end
  end
  return out
end

-- The unfused composite the Swin model used: conv1x1 → relu → conv1x1 on the [W, C, N, N] features.
local function position_bias_composite(pos, w1, b1, w2, b2)
  local d = pos:unsqueeze(2) - pos:unsqueeze(3)
  local hidden = T.F.conv2d(d:sign() * d:abs():log1p(), w1, b1):relu()
  return T.F.conv2d(hidden, w2, b2)
end

-- Distinct random positions (no two tokens share a coordinate: no kink of sign(d) log1p|d| at 0).
local function positions(W, C, N, seed)
  local values = S.randoms(W * C * N, seed, 0, 1)
  for k = 1, #values do values[k] = values[k] * 4 + (k % N) * 4 end -- coordinate ranges per token disjoint
  return T.tensor(S.nest(values, { W, C, N }), { dtype = 'float64' })
end

describe('relative_position_bias', function()
  it('matches a plain-Lua reference (float64) with and without biases', function()
    local pos = positions(2, 2, 5, 200)
    local w1, b1, w2, b2 = rand({ 3, 2 }, 201), rand({ 3 }, 202), rand({ 2, 3 }, 203), rand({ 2 }, 204)
    local expected = position_bias_reference(pos:totable(), w1:totable(), b1:totable(), w2:totable(), b2:totable())
    S.assert_close(rpb(pos, w1, b1, w2, b2), T.tensor(expected, { dtype = 'float64' }), 1e-12, 1e-13)
    expected = position_bias_reference(pos:totable(), w1:totable(), nil, w2:totable(), nil)
    S.assert_close(rpb(pos, w1, nil, w2, nil), T.tensor(expected, { dtype = 'float64' }), 1e-12, 1e-13)
  end)

  it('matches the conv1x1-relu-conv1x1 composite: Swin shapes, 1x1 conv weights, N off the block size', function()
    for _, case in ipairs { { 3, 2, 64, 8, 3 }, { 2, 2, 9, 5, 4 }, { 2, 3, 20, 4, 2 }, { 1, 2, 1, 3, 2 } } do
      local W, C, N, P, H = unpack(case)
      local pos = positions(W, C, N, 210 + N)
      local w1, b1 = rand({ P, C, 1, 1 }, 211), rand({ P }, 212)
      local w2, b2 = rand({ H, P, 1, 1 }, 213), rand({ H }, 214)
      local expected = position_bias_composite(pos, w1, b1, w2, b2)
      S.assert_close(rpb(pos, w1, b1, w2, b2), expected, 1e-12, 1e-13, 'float64 ' .. N)
      local out32 = rpb(pos:float(), w1:float(), b1:float(), w2:float(), b2:float())
      assert.equal('float32', out32.dtype)
      S.assert_close(out32:double(), expected, 1e-5, 1e-5, 'float32 ' .. N)
    end
  end)

  it('takes strided positions as the model passes them (window partition, then transpose)', function()
    local pos = positions(3, 7, 2, 220):transpose(1, 2) -- [3, 2, 7], not contiguous
    local w1, b1, w2, b2 = rand({ 4, 2 }, 221), rand({ 4 }, 222), rand({ 3, 4 }, 223), rand({ 3 }, 224)
    local expected = position_bias_composite(pos, w1:view(4, 2, 1, 1), b1, w2:view(3, 4, 1, 1), b2)
    S.assert_close(rpb(pos, w1, b1, w2, b2), expected, 1e-12, 1e-13)
  end)

  it('passes gradcheck for positions, weights and biases', function()
    local pos = positions(2, 2, 4, 230):requires_grad_()
    local w1, b1 = leaf({ 3, 2, 1, 1 }, 231), leaf({ 3 }, 232, 0.2, 1)
    local w2, b2 = leaf({ 2, 3, 1, 1 }, 233), leaf({ 2 }, 234)
    check_grad('relative_position_bias', rpb, { pos, w1, b1, w2, b2 })
    local strided = positions(2, 18, 2, 235):transpose(1, 2):requires_grad_() -- N = 18 spans two blocks
    local w1m, w2m = leaf({ 2, 2 }, 236), leaf({ 3, 2 }, 237)
    check_grad('relative_position_bias strided, no biases', function(p, a, b) return rpb(p, a, nil, b, nil) end,
      { strided, w1m, w2m })
  end)

  it('matches the composite gradients in float32 on a Swin stage-1 shape', function()
    local pos = positions(4, 2, 64, 240):float()
    local w1, b1 = rand({ 32, 2, 1, 1 }, 241):float():requires_grad_(), rand({ 32 }, 242):float():requires_grad_()
    local w2, b2 = rand({ 3, 32, 1, 1 }, 243):float():requires_grad_(), rand({ 3 }, 244):float():requires_grad_()
    compare_with_composite({ pos, w1, b1, w2, b2 }, rpb, position_bias_composite, 2e-4)
  end)

  it('gives gradients only to the inputs that require them', function()
    local pos = positions(2, 2, 3, 250)
    local w1, w2 = leaf({ 2, 2 }, 251), rand({ 2, 2 }, 252)
    local out = rpb(pos, w1, nil, w2, nil)
    assert.equal('relative_position_bias', out.grad_fn)
    out:sum():backward()
    assert.same({ 2, 2 }, w1.grad.shape)
    assert.is_nil(pos.grad)
    assert.is_nil(w2.grad)
    assert.is_nil(rpb(pos, w1:detach(), nil, w2, nil).grad_fn)
  end)

  it('names bad shapes and dtypes', function()
    local pos, w1, b1 = positions(2, 2, 3, 260), rand({ 4, 2 }, 261), rand({ 4 }, 262)
    local w2, b2 = rand({ 3, 4 }, 263), rand({ 3 }, 264)
    S.assert_error(function() rpb(pos:view(2, 6), w1, b1, w2, b2) end, 'relative_position_bias',
      'pos must be [windows, coordinates, tokens]', '[2,6]')
    S.assert_error(function() rpb(pos, rand({ 4, 3 }, 265), b1, w2, b2) end, 'w1 must be [out, 2]', '[4,3]', '[2,2,3]')
    S.assert_error(function() rpb(pos, w1, b1, rand({ 3, 5, 1, 1 }, 266), b2) end, 'w2 must be [out, 4]', '[3,5,1,1]')
    S.assert_error(function() rpb(pos, w1, rand({ 5 }, 267), w2, b2) end, 'b1 must be [4]', '[5]')
    S.assert_error(function() rpb(pos, w1, b1, w2, rand({ 4 }, 268)) end, 'b2 must be [3]', '[4]')
    S.assert_error(function() rpb(pos:float(), w1, b1, w2, b2) end, 'one floating dtype', 'float32', 'float64')
    S.assert_error(function() rpb(pos:to('int64'), w1, b1, w2, b2) end, 'floating-point pos', 'int64')
    S.assert_error(function() rpb(pos, 'w1', b1, w2, b2) end, 'relative_position_bias', 'expected a tensor')
  end)
end)

-- ---- attention on packed projections ---------------------------------------------------------------
local packed = T.F.packed_attention

-- The reference: split the heads with views, scaled_dot_product_attention, merge them.
local function packed_reference(q, kv, heads, bias, scale)
  local nb = q:dim() - 2
  local function heads_of(t, count)
    local shape = t.shape
    local n = shape[nb + 1]
    local split = {}
    for d = 1, nb do split[d] = shape[d] end
    local hd = shape[nb + 2] / (count * heads)
    for _, s in ipairs { n, count, heads, hd } do split[#split + 1] = s end
    local perm = { nb + 1 }
    for d = 0, nb - 1 do perm[#perm + 1] = d end
    perm[#perm + 1] = nb + 2
    perm[#perm + 1] = nb
    perm[#perm + 1] = nb + 3
    local moved = t:reshape(unpack(split)):permute(unpack(perm))
    local parts = {}
    for i = 0, count - 1 do parts[i + 1] = moved:select(0, i) end
    return unpack(parts)
  end
  local qh, kh, vh
  if kv then
    qh = heads_of(q, 1)
    kh, vh = heads_of(kv, 2)
  else
    qh, kh, vh = heads_of(q, 3)
  end
  local o = sdpa(qh, kh, vh, { bias = bias, scale = scale })
  local shape = q.shape
  shape[#shape] = qh:size(-1) * heads
  return o:transpose(nb, nb + 1):reshape(unpack(shape))
end

describe('packed_attention', function()
  it('matches splitting the heads, scaled_dot_product_attention and merging (qkv and q + kv)', function()
    local qkv = rand({ 2, 5, 3 * 12 }, 300)
    S.assert_close(packed(qkv, 3), packed_reference(qkv, nil, 3), 1e-12, 1e-13)
    local bias = rand({ 3, 5, 5 }, 301, -2, 2)
    S.assert_close(packed(qkv, 3, { bias = bias, scale = 0.4 }), packed_reference(qkv, nil, 3, bias, 0.4), 1e-12, 1e-13)
    local q, kv = rand({ 2, 3, 7, 8 }, 302), rand({ 2, 3, 4, 16 }, 303)
    local out = packed(q, 2, { kv = kv })
    assert.same({ 2, 3, 7, 8 }, out.shape)
    S.assert_close(out, packed_reference(q, kv, 2), 1e-12, 1e-13)
  end)

  it('takes the Swin layout: qkv [B, nW, N, 3C] with a [P, nW, H, N, N] bias, and strided inputs', function()
    local B, nW, N, H, hd = 2, 3, 9, 2, 4
    local qkv = rand({ B, nW, N, 3 * H * hd }, 310)
    for _, P in ipairs { 1, B } do
      local bias = rand({ P, nW, H, N, N }, 311 + P, -2, 2)
      S.assert_close(packed(qkv, H, { bias = bias }), packed_reference(qkv, nil, H, bias), 1e-12, 1e-13)
    end
    local strided = rand({ 3 * H * hd, B, N }, 313):permute(1, 2, 0) -- [B, N, 3C], not contiguous
    S.assert_close(packed(strided, H), packed_reference(strided, nil, H), 1e-12, 1e-13)
  end)

  it('passes gradcheck for qkv, q and kv, and the bias', function()
    local qkv, bias = leaf({ 2, 4, 3 * 6 }, 320), leaf({ 1, 3, 4, 4 }, 321)
    check_grad('packed qkv', function(x, b) return packed(x, 3, { bias = b }) end, { qkv, bias })
    local q, kv = leaf({ 2, 3, 4 }, 322), leaf({ 2, 5, 8 }, 323)
    check_grad('packed q kv', function(a, b) return packed(a, 2, { kv = b, scale = 0.6 }) end, { q, kv })
    check_grad('packed q only', function(a) return packed(a, 2, { kv = kv:detach() }) end, { q })
  end)

  it('matches the reference gradients in float32 on a Swin block shape', function()
    local qkv = rand({ 2, 4, 64, 3 * 96 }, 330):float():requires_grad_()
    local bias = rand({ 2, 4, 3, 64, 64 }, 331):float():requires_grad_()
    compare_with_composite({ qkv, bias }, function(x, b) return packed(x, 3, { bias = b }) end,
      function(x, b) return packed_reference(x, nil, 3, b) end, 1e-5)
  end)

  it('names bad shapes, heads and options', function()
    local qkv = rand({ 2, 4, 18 }, 340)
    S.assert_error(function() packed(qkv, 4) end, 'packed_attention', 'last dim of qkv [2,4,18]', '3 x num_heads (4)')
    S.assert_error(function() packed(qkv, 0) end, 'num_heads must be positive')
    S.assert_error(function() packed(rand({ 2, 4, 6 }, 341), 2, { kv = rand({ 3, 4, 12 }, 342) }) end,
      'kv must be [..., Nk, 12]', '[3,4,12]')
    S.assert_error(function() packed(rand({ 2, 4, 6 }, 343), 2, { kv = rand({ 2, 4, 6 }, 344) }) end, 'kv must be')
    S.assert_error(function() packed(qkv, 3, { bias = rand({ 2, 2, 4, 4 }, 345) }) end,
      'bias [2,2,4,4] is not broadcastable to the attention scores [2,3,4,4]')
    S.assert_error(function() packed(qkv, 3, { kv = qkv:float() }) end, 'one floating dtype')
    S.assert_error(function() packed(qkv, 3, { dropout_p = 0.1 }) end, "unknown option 'dropout_p'")
  end)
end)
