-- nn_spatial_spec.lua — conv2d, pooling, interpolate, pad, roll and pixel (un)shuffle: forward
-- against plain-Lua direct loops in float64, gradients by T.gradcheck, and the error messages.
local T = require 'tessera'
local S = require 'support'
local ffi = require 'ffi'
local F = T.F

local floor = math.floor

-- ---- helpers -----------------------------------------------------------------------------------
local numel = S.numel

-- A tensor of random values in [lo, hi) and its flat Lua values (row-major, 1-based).
local function rand(shape, seed, dtype, lo, hi)
  local flat = S.randoms(numel(shape), seed, lo or -1, hi or 1)
  return T.tensor(S.nest(flat, shape), { dtype = dtype or 'float64' }), flat
end

-- A float64 leaf that requires grad; strided (non-contiguous) when asked.
local function leaf(shape, seed, strided) return S.grad_leaf(shape, seed, nil, nil, strided) end
local check_grad = S.gradcheck

-- ---- references: direct loops over flat row-major values ---------------------------------------
local function conv_ref(x, xs, w, ws, b, o)
  local N, Cin, H, W = xs[1], xs[2], xs[3], xs[4]
  local O, Cg, kh, kw = ws[1], ws[2], ws[3], ws[4]
  local sh, sw, ph, pw, dh, dw, groups = o.sh or 1, o.sw or 1, o.ph or 0, o.pw or 0, o.dh or 1, o.dw or 1, o.groups or 1
  local OH = floor((H + 2 * ph - dh * (kh - 1) - 1) / sh) + 1
  local OW = floor((W + 2 * pw - dw * (kw - 1) - 1) / sw) + 1
  local Og, out = O / groups, {}
  for n = 0, N - 1 do
    for oc = 0, O - 1 do
      local g = floor(oc / Og)
      for oh = 0, OH - 1 do
        for ow = 0, OW - 1 do
          local sum = b and b[oc + 1] or 0
          for c = 0, Cg - 1 do
            for i = 0, kh - 1 do
              for j = 0, kw - 1 do
                local ih, iw = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                if ih >= 0 and ih < H and iw >= 0 and iw < W then
                  sum = sum + x[((n * Cin + g * Cg + c) * H + ih) * W + iw + 1] * w[((oc * Cg + c) * kh + i) * kw + j + 1]
                end
              end
            end
          end
          out[#out + 1] = sum
        end
      end
    end
  end
  return out, { N, O, OH, OW }
end

local function pooled_size(n, k, s, p, d, ceil_mode)
  local span = d * (k - 1) + 1
  local out = floor((n + 2 * p - span + (ceil_mode and s - 1 or 0)) / s) + 1
  if ceil_mode and (out - 1) * s >= n + p then out = out - 1 end
  return out
end

-- Calls cell(plane, oh, ow, OH, OW) for every output cell of [planes, H, W] inputs.
local function each_cell(planes, OH, OW, cell)
  local out = {}
  for c = 0, planes - 1 do
    for oh = 0, OH - 1 do
      for ow = 0, OW - 1 do out[#out + 1] = cell(c, oh, ow) end
    end
  end
  return out
end

local function avg_pool_ref(x, planes, H, W, o)
  local OH = pooled_size(H, o.kh, o.sh, o.ph, 1, o.ceil)
  local OW = pooled_size(W, o.kw, o.sw, o.pw, 1, o.ceil)
  return each_cell(planes, OH, OW, function(c, oh, ow)
    local h0, w0 = oh * o.sh - o.ph, ow * o.sw - o.pw
    local h1, w1 = math.min(h0 + o.kh, H + o.ph), math.min(w0 + o.kw, W + o.pw)
    local padded = (h1 - h0) * (w1 - w0)
    h0, w0, h1, w1 = math.max(h0, 0), math.max(w0, 0), math.min(h1, H), math.min(w1, W)
    local sum = 0
    for h = h0, h1 - 1 do for w = w0, w1 - 1 do sum = sum + x[(c * H + h) * W + w + 1] end end
    return sum / (o.include and padded or (h1 - h0) * (w1 - w0))
  end), OH, OW
end

local function max_pool_ref(x, planes, H, W, o)
  local dh, dw = o.dh or 1, o.dw or 1
  local OH = pooled_size(H, o.kh, o.sh, o.ph, dh, o.ceil)
  local OW = pooled_size(W, o.kw, o.sw, o.pw, dw, o.ceil)
  return each_cell(planes, OH, OW, function(c, oh, ow)
    local best = -math.huge
    for i = 0, o.kh - 1 do
      for j = 0, o.kw - 1 do
        local h, w = oh * o.sh - o.ph + i * dh, ow * o.sw - o.pw + j * dw
        if h >= 0 and h < H and w >= 0 and w < W then best = math.max(best, x[(c * H + h) * W + w + 1]) end
      end
    end
    return best
  end), OH, OW
end

local function adaptive_ref(x, planes, H, W, OH, OW)
  return each_cell(planes, OH, OW, function(c, oh, ow)
    local h0, h1 = floor(oh * H / OH), math.ceil((oh + 1) * H / OH)
    local w0, w1 = floor(ow * W / OW), math.ceil((ow + 1) * W / OW)
    local sum = 0
    for h = h0, h1 - 1 do for w = w0, w1 - 1 do sum = sum + x[(c * H + h) * W + w + 1] end end
    return sum / ((h1 - h0) * (w1 - w0))
  end)
end

-- torch's nearest index: float arithmetic, scale = 1/scale_factor when given, else in/out.
local f32 = ffi.new('float[1]')
local function fround(v) f32[0] = v; return f32[0] end
local function nearest_index(o, n_in, n_out, scale_factor)
  if n_out == n_in then return o end
  if n_out == 2 * n_in then return floor(o / 2) end
  local scale = scale_factor and fround(1 / scale_factor) or fround(fround(n_in) / fround(n_out))
  return math.min(floor(fround(o * scale)), n_in - 1)
end

-- torch's linear source: index, neighbour step and weight of the second neighbour.
local function linear_source(o, n_in, n_out, align, scale_factor)
  local src
  if align then
    src = n_out > 1 and o * (n_in - 1) / (n_out - 1) or 0
  else
    local scale = scale_factor and 1 / scale_factor or n_in / n_out
    src = math.max(scale * (o + 0.5) - 0.5, 0)
  end
  local i = math.min(floor(src), n_in - 1)
  return i, i < n_in - 1 and 1 or 0, math.min(math.max(src - i, 0), 1)
end

local function interpolate_ref(x, planes, H, W, OH, OW, mode, align, sf_h, sf_w)
  return each_cell(planes, OH, OW, function(c, oh, ow)
    local function at(h, w) return x[(c * H + h) * W + w + 1] end
    if mode == 'nearest' then return at(nearest_index(oh, H, OH, sf_h), nearest_index(ow, W, OW, sf_w)) end
    local h, hs, lh = linear_source(oh, H, OH, align, sf_h)
    local w, ws, lw = linear_source(ow, W, OW, align, sf_w)
    return (1 - lh) * ((1 - lw) * at(h, w) + lw * at(h, w + ws)) + lh * ((1 - lw) * at(h + hs, w) + lw * at(h + hs, w + ws))
  end)
end

-- ---- conv2d ------------------------------------------------------------------------------------
describe('conv2d', function()
  -- x [N, C, H, W], w [O, C/groups, kh, kw], options in reference names and F.conv2d names
  local function compare(xs, ws, o, opts, with_bias, dtype, tol)
    local x, xf = rand(xs, 1, dtype)
    local w, wf = rand(ws, 2, dtype)
    local b, bf
    if with_bias then b, bf = rand({ ws[1] }, 3, dtype) end
    local y = F.conv2d(x, w, b, opts)
    local ref, shape = conv_ref(xf, xs, wf, ws, bf, o)
    assert.same(shape, y.shape)
    assert.equal(dtype or 'float64', y.dtype)
    S.assert_close(y, ref, tol or 1e-12, tol or 1e-12)
  end

  it('matches direct loops with stride, padding, dilation and groups', function()
    compare({ 2, 4, 7, 6 }, { 6, 2, 3, 2 }, { sh = 2, sw = 1, ph = 1, pw = 2, dh = 2, dw = 1, groups = 2 },
      { stride = { 2, 1 }, padding = { 1, 2 }, dilation = { 2, 1 }, groups = 2 }, true)
    compare({ 1, 3, 5, 5 }, { 2, 3, 3, 3 }, { sh = 1, sw = 1, ph = 1, pw = 1 }, { padding = 1 }, false)
    compare({ 2, 3, 6, 7 }, { 3, 1, 2, 3 }, { sh = 3, sw = 2, groups = 3 }, { stride = { 3, 2 }, groups = 3 }, true)
    compare({ 2, 4, 6, 5 }, { 4, 2, 3, 3 }, { sh = 2, sw = 2, ph = 1, pw = 1, groups = 2 },
      { stride = 2, padding = 1, groups = 2 }, true, 'float32', 1e-5)
  end)

  it('matches direct loops on the depthwise path, with a channel multiplier', function()
    compare({ 2, 3, 7, 8 }, { 3, 1, 3, 3 }, { ph = 1, pw = 1, groups = 3 }, { padding = 1, groups = 3 }, true)
    compare({ 2, 3, 7, 8 }, { 6, 1, 3, 2 }, { sh = 2, sw = 3, ph = 1, pw = 1, dh = 2, dw = 2, groups = 3 },
      { stride = { 2, 3 }, padding = 1, dilation = 2, groups = 3 }, false)
    compare({ 1, 4, 9, 9 }, { 4, 1, 7, 7 }, { ph = 3, pw = 3, groups = 4 }, { padding = 3, groups = 4 }, true, 'float32', 1e-5)
  end)

  it('matches direct loops on the 1x1 path (plain GEMM, no im2col), grouped too', function()
    compare({ 2, 6, 5, 4 }, { 3, 6, 1, 1 }, {}, nil, true)
    compare({ 3, 6, 4, 3 }, { 4, 3, 1, 1 }, { groups = 2 }, { groups = 2 }, false)
    compare({ 2, 6, 5, 4 }, { 3, 6, 1, 1 }, { dh = 3, dw = 2 }, { dilation = { 3, 2 } }, true, 'float32', 1e-5)
    -- 1x1 with stride or padding is not the direct path but must agree as well
    compare({ 2, 4, 5, 5 }, { 3, 4, 1, 1 }, { sh = 2, sw = 2, ph = 1, pw = 1 }, { stride = 2, padding = 1 }, true)
  end)

  it('matches direct loops on the patch-embedding path (kernel == stride)', function()
    compare({ 2, 3, 32, 48 }, { 4, 3, 16, 16 }, { sh = 16, sw = 16 }, { stride = 16 }, true, 'float32', 1e-5)
    compare({ 2, 3, 9, 10 }, { 5, 3, 4, 4 }, { sh = 4, sw = 4 }, { stride = 4 }, true) -- remainder dropped
    compare({ 1, 2, 6, 4 }, { 3, 2, 2, 2 }, { sh = 2, sw = 2 }, { stride = 2 }, false)
    compare({ 2, 2, 6, 6 }, { 3, 2, 3, 2 }, { sh = 3, sw = 2 }, { stride = { 3, 2 } }, true)
  end)

  it('takes unbatched and strided inputs, bias as the third argument or left out', function()
    local x, xf = rand({ 3, 5, 6 }, 4)
    local w, wf = rand({ 2, 3, 3, 3 }, 5)
    local y = F.conv2d(x, w, { padding = 1 })
    assert.same({ 2, 5, 6 }, y.shape)
    S.assert_close(y, (conv_ref(xf, { 1, 3, 5, 6 }, wf, { 2, 3, 3, 3 }, nil, { ph = 1, pw = 1 })), 1e-12, 1e-12)
    local xs = S.noncontiguous(rand({ 2, 3, 5, 6 }, 6))
    local ws = w:permute(0, 1, 3, 2):contiguous():permute(0, 1, 3, 2) -- same values, strided
    assert.is_false(ws:is_contiguous())
    S.assert_close(F.conv2d(xs, ws), F.conv2d(xs:contiguous(), w), 1e-12, 1e-12)
  end)

  it("supports padding 'valid' and 'same' (odd total padding extra at the bottom/right)", function()
    local x = rand({ 1, 2, 6, 5 }, 7)
    local w = rand({ 3, 2, 4, 3 }, 8)
    assert.same({ 1, 3, 3, 3 }, F.conv2d(x, w, { padding = 'valid' }).shape)
    local same = F.conv2d(x, w, { padding = 'same' })
    assert.same({ 1, 3, 6, 5 }, same.shape)
    -- kernel 4 pads (1, 2) rows, kernel 3 pads (1, 1) columns
    S.assert_close(same, F.conv2d(F.pad(x, { 1, 1, 1, 2 }), w), 1e-12, 1e-12)
    local dilated = F.conv2d(x, rand({ 3, 2, 3, 3 }, 9), { padding = 'same', dilation = 2 })
    assert.same({ 1, 3, 6, 5 }, dilated.shape)
  end)

  it('computes float16 and bfloat16 through float32', function()
    local x = rand({ 1, 2, 5, 5 }, 10, 'float32')
    local w = rand({ 3, 2, 3, 3 }, 11, 'float32')
    for _, dt in ipairs { 'float16', 'bfloat16' } do
      local y = F.conv2d(x:to(dt), w:to(dt), { padding = 1 })
      assert.equal(dt, y.dtype)
      S.assert_close(y:float(), F.conv2d(x:to(dt):float(), w:to(dt):float(), { padding = 1 }), 1e-2, 2e-2)
    end
  end)

  it('gives the same results and gradients when a large batch is split into chunks', function()
    -- 16 samples of 16 x 64 x 64: the im2col buffer holds 14 samples, so the batch goes in two chunks
    local x = rand({ 16, 16, 64, 64 }, 12, 'float32'):requires_grad_()
    local w = rand({ 8, 16, 3, 3 }, 13, 'float32'):requires_grad_()
    local y = F.conv2d(x, w, { padding = 1 })
    local g = rand(y.shape, 14, 'float32')
    y:backward(g)
    local gw = T.zeros({ 8, 16, 3, 3 })
    for _, n in ipairs { 0, 13, 14, 15 } do
      local xn = x:detach():narrow(0, n, 1):requires_grad_()
      local wn = w:detach():requires_grad_()
      local yn = F.conv2d(xn, wn, { padding = 1 })
      S.assert_close(y:detach():narrow(0, n, 1), yn, 1e-5, 1e-5)
      yn:backward(g:narrow(0, n, 1))
      S.assert_close(x.grad:narrow(0, n, 1), xn.grad, 1e-5, 1e-5)
      gw = gw + wn.grad
    end
    assert.is_true(gw:abs():sum():item() > 0)
  end)

  it('has gradients for input, weight and bias on every path', function()
    local conv = function(opts) return function(x, w, b) return F.conv2d(x, w, b, opts) end end
    check_grad('conv2d generic', conv({ stride = { 2, 1 }, padding = { 1, 2 }, dilation = { 1, 2 }, groups = 2 }),
      { leaf({ 2, 4, 5, 4 }, 20), leaf({ 4, 2, 3, 2 }, 21), leaf({ 4 }, 22) })
    check_grad('conv2d 1x1', conv({ groups = 2 }), { leaf({ 2, 4, 3, 3 }, 23), leaf({ 6, 2, 1, 1 }, 24), leaf({ 6 }, 25) })
    check_grad('conv2d patches', conv({ stride = 2 }), { leaf({ 2, 3, 5, 4 }, 26), leaf({ 2, 3, 2, 2 }, 27), leaf({ 2 }, 28) })
    check_grad('conv2d depthwise', conv({ stride = { 1, 2 }, padding = 1, dilation = { 2, 1 }, groups = 2 }),
      { leaf({ 2, 2, 5, 6 }, 35), leaf({ 4, 1, 3, 3 }, 36), leaf({ 4 }, 37) })
    check_grad('conv2d strided input', conv({ padding = 1 }), { leaf({ 1, 2, 3, 4 }, 29, true), leaf({ 3, 2, 3, 3 }, 30) })
    check_grad('conv2d unbatched', conv({ padding = 1, stride = 2 }), { leaf({ 2, 4, 4 }, 31), leaf({ 2, 2, 3, 3 }, 32) })
  end)

  it('differentiates only what requires grad, keeping no activations for frozen weights', function()
    local x, w = rand({ 2, 2, 4, 4 }, 33), rand({ 3, 2, 3, 3 }, 34)
    check_grad('conv2d input only', function(a) return F.conv2d(a, w, { padding = 1 }) end, { x:clone():requires_grad_() })
    check_grad('conv2d weight only', function(a) return F.conv2d(x, a, { padding = 1 }) end, { w:clone():requires_grad_() })
    local y = F.conv2d(x, w:clone():requires_grad_())
    assert.equal('conv2d', y.grad_fn)
  end)

  it('explains bad arguments', function()
    local x = T.ones({ 1, 5, 6, 6 })
    S.assert_error(function() F.conv2d(x, T.ones({ 4, 3, 3, 3 }), { groups = 2 }) end,
      'conv2d: expected input with C = 6 channels for weight [4,3,3,3] and groups 2, got 5')
    S.assert_error(function() F.conv2d(T.ones({ 1, 6, 6, 6 }), T.ones({ 3, 3, 3, 3 }), { groups = 2 }) end,
      'groups=2', 'divisible by 2')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 2, 2 }), T.ones({ 4, 3, 3, 3 })) end,
      'padded input size per channel (2 x 2)', 'dilated kernel (3 x 3)')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), T.ones({ 3 })) end,
      'bias of shape [4]', 'got [3]')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }, { dtype = 'float64' })) end,
      'same dtype', 'float32', 'float64')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }, { dtype = 'int64' }), T.ones({ 4, 3, 3, 3 }, { dtype = 'int64' })) end,
      'floating point', 'int64')
    S.assert_error(function() F.conv2d(T.ones({ 3, 5 }), T.ones({ 4, 3, 3, 3 })) end, '4-D (batched) input', '[3,5]')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3 })) end, '4-D weight')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), { stride = 0 }) end, 'non-positive stride')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), { padding = -1 }) end, 'negative padding')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), { strides = 2 }) end,
      "unknown option 'strides'", 'dilation, groups, padding, stride')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), { stride = { 1, 2, 3 } }) end,
      'stride must be an integer or a pair')
    S.assert_error(function() F.conv2d(T.ones({ 1, 3, 5, 5 }), T.ones({ 4, 3, 3, 3 }), { padding = 'same', stride = 2 }) end,
      "padding='same' is not supported for strided convolutions")
  end)
end)

-- ---- pooling -----------------------------------------------------------------------------------
describe('pooling', function()
  local shape = { 2, 3, 7, 6 }

  it('avg_pool2d matches direct loops with padding, ceil_mode and both divisors', function()
    local x, xf = rand(shape, 40)
    for _, c in ipairs {
      { kh = 3, kw = 2, sh = 2, sw = 2, ph = 1, pw = 1, ceil = false, include = true },
      { kh = 3, kw = 3, sh = 2, sw = 2, ph = 1, pw = 1, ceil = true, include = false },
      { kh = 2, kw = 3, sh = 3, sw = 2, ph = 0, pw = 1, ceil = true, include = true },
      { kh = 2, kw = 2, sh = 2, sw = 2, ph = 0, pw = 0, ceil = false, include = true },
    } do
      local y = F.avg_pool2d(x, { c.kh, c.kw }, { stride = { c.sh, c.sw }, padding = { c.ph, c.pw }, ceil_mode = c.ceil,
        count_include_pad = c.include })
      local ref, OH, OW = avg_pool_ref(xf, 6, 7, 6, c)
      assert.same({ 2, 3, OH, OW }, y.shape)
      S.assert_close(y, ref, 1e-12, 1e-12)
    end
    -- stride defaults to the kernel size; a 3-D input is one image
    S.assert_close(F.avg_pool2d(x[0], 2), (avg_pool_ref(xf, 3, 7, 6, { kh = 2, kw = 2, sh = 2, sw = 2, ph = 0, pw = 0 })),
      1e-12, 1e-12)
  end)

  it('max_pool2d matches direct loops with padding, dilation and ceil_mode', function()
    local x, xf = rand(shape, 41)
    for _, c in ipairs {
      { kh = 3, kw = 2, sh = 2, sw = 1, ph = 1, pw = 1 },
      { kh = 3, kw = 3, sh = 2, sw = 2, ph = 1, pw = 1, ceil = true },
      { kh = 2, kw = 3, sh = 2, sw = 2, ph = 1, pw = 0, dh = 2, dw = 2, ceil = true },
    } do
      local y = F.max_pool2d(x, { c.kh, c.kw }, { stride = { c.sh, c.sw }, padding = { c.ph, c.pw },
        dilation = { c.dh or 1, c.dw or 1 }, ceil_mode = c.ceil or false })
      local ref, OH, OW = max_pool_ref(xf, 6, 7, 6, c)
      assert.same({ 2, 3, OH, OW }, y.shape)
      S.assert_close(y, ref, 0, 0)
    end
    local y32 = F.max_pool2d(x:float(), 2)
    assert.equal('float32', y32.dtype)
    S.assert_close(y32, F.max_pool2d(x, 2), 1e-6, 1e-7)
  end)

  it('max_pool2d propagates NaN and sends the gradient of a tie to the first maximum', function()
    local y = F.max_pool2d(T.tensor({ { { 1, 0 / 0 }, { 3, 2 } } }), 2)
    assert.is_true(y:item() ~= y:item())
    local x = T.tensor({ { { 5, 5 }, { 1, 5 } } }, { dtype = 'float64' }):requires_grad_()
    F.max_pool2d(x, 2):sum():backward()
    S.assert_close(x.grad, { 1, 0, 0, 0 }, 0, 0)
    -- a dilated window can fall between the rows of a 1-row input: -inf and no gradient, as torch
    local thin = T.tensor({ { { { 1, 2, 3 } } } }, { dtype = 'float64' }):requires_grad_()
    local y2 = F.max_pool2d(thin, { 2, 1 }, { stride = 1, padding = { 2, 0 }, dilation = { 3, 1 } })
    S.assert_close(y2, T.full({ 1, 1, 2, 3 }, -math.huge), 0, 0)
    F.max_pool2d(thin, { 2, 1 }, { stride = 1, padding = { 2, 0 }, dilation = { 3, 1 } }):sum():backward()
    S.assert_close(thin.grad, { 0, 0, 0 }, 0, 0)
  end)

  it('adaptive_avg_pool2d matches the start/end index formula, sizes not dividing', function()
    local x, xf = rand({ 2, 2, 5, 7 }, 42)
    for _, o in ipairs { { 3, 4 }, { 2, 2 }, { 5, 7 }, { 7, 9 }, { 1, 1 } } do
      local y = F.adaptive_avg_pool2d(x, o)
      assert.same({ 2, 2, o[1], o[2] }, y.shape)
      S.assert_close(y, adaptive_ref(xf, 4, 5, 7, o[1], o[2]), 1e-12, 1e-12)
    end
    S.assert_close(F.adaptive_avg_pool2d(x, 1):view(2, 2), x:mean({ 2, 3 }), 1e-12, 1e-12)
    assert.same({ 2, 3, 3 }, F.adaptive_avg_pool2d(x[0], 3).shape)
  end)

  it('have gradients', function()
    check_grad('avg_pool2d', function(x) return F.avg_pool2d(x, 3, { stride = 2, padding = 1, ceil_mode = true }) end,
      { leaf({ 2, 2, 5, 6 }, 43, true) })
    check_grad('avg_pool2d exclude pad', function(x)
      return F.avg_pool2d(x, { 2, 3 }, { stride = { 1, 2 }, padding = { 1, 1 }, count_include_pad = false })
    end, { leaf({ 1, 2, 4, 5 }, 44) })
    check_grad('max_pool2d', function(x)
      return F.max_pool2d(x, 3, { stride = 2, padding = 1, dilation = { 1, 2 }, ceil_mode = true })
    end, { leaf({ 2, 2, 6, 7 }, 45, true) })
    check_grad('adaptive_avg_pool2d', function(x) return F.adaptive_avg_pool2d(x, { 3, 4 }) end, { leaf({ 2, 2, 5, 7 }, 46) })
    check_grad('adaptive_avg_pool2d up', function(x) return F.adaptive_avg_pool2d(x, { 4, 3 }) end, { leaf({ 1, 2, 3, 2 }, 47) })
  end)

  it('explain bad arguments', function()
    local x = T.ones({ 1, 2, 4, 4 })
    S.assert_error(function() F.avg_pool2d(x, 2, { padding = 2 }) end, 'avg_pool2d', 'at most half')
    S.assert_error(function() F.max_pool2d(x, 3, { padding = 2 }) end, 'max_pool2d', 'at most half of the effective kernel')
    S.assert_error(function() F.max_pool2d(x, 5) end, 'output size of 0 x 0', 'too small')
    S.assert_error(function() F.avg_pool2d(x, 0) end, 'must be positive')
    S.assert_error(function() F.avg_pool2d(T.ones({ 4, 4 }), 2) end, '3-D [C, H, W] or 4-D', '[4,4]')
    S.assert_error(function() F.max_pool2d(T.ones({ 1, 2, 4, 4 }, { dtype = 'int64' }), 2) end, 'floating point', 'int64')
    S.assert_error(function() F.avg_pool2d(x, 2, { divisor_override = 3 }) end,
      "unknown option 'divisor_override'", 'ceil_mode, count_include_pad, padding, stride')
    S.assert_error(function() F.max_pool2d(x, 2, { ceil_mode = 1 }) end, 'ceil_mode must be a boolean')
    S.assert_error(function() F.adaptive_avg_pool2d(x, { 0, 2 }) end, 'output size must be positive')
  end)
end)

-- ---- interpolate -------------------------------------------------------------------------------
describe('interpolate', function()
  local x, xf = rand({ 2, 2, 4, 5 }, 50)

  it('nearest matches floor(dst * in / out), up and down, and 1 / scale_factor when given', function()
    for _, o in ipairs { { 7, 9 }, { 3, 2 }, { 8, 10 }, { 4, 5 }, { 1, 13 } } do
      local y = F.interpolate(x, { size = o })
      assert.same({ 2, 2, o[1], o[2] }, y.shape)
      S.assert_close(y, interpolate_ref(xf, 4, 4, 5, o[1], o[2], 'nearest'), 0, 0)
    end
    local y = F.interpolate(x, { scale_factor = 1.7 }) -- 4 x 5 -> 6 x 8, coordinates through 1/1.7
    assert.same({ 2, 2, 6, 8 }, y.shape)
    S.assert_close(y, interpolate_ref(xf, 4, 4, 5, 6, 8, 'nearest', false, 1.7, 1.7), 0, 0)
    local r = F.interpolate(x, { scale_factor = { 1.7, 0.5 }, recompute_scale_factor = true })
    S.assert_close(r, interpolate_ref(xf, 4, 4, 5, 6, 2, 'nearest'), 0, 0)
    S.assert_close(F.interpolate(T.tensor({ { { { 0, 1 } } } }), { size = { 1, 3 } }), { 0, 0, 1 }, 0, 0)
  end)

  it('bilinear matches torch with align_corners true and false, up and down', function()
    for _, align in ipairs { false, true } do
      for _, o in ipairs { { 7, 9 }, { 3, 2 }, { 1, 1 }, { 4, 5 }, { 9, 3 } } do
        local y = F.interpolate(x, { size = o, mode = 'bilinear', align_corners = align })
        S.assert_close(y, interpolate_ref(xf, 4, 4, 5, o[1], o[2], 'bilinear', align), 1e-12, 1e-12)
      end
    end
    local y = F.interpolate(x, { scale_factor = { 1.5, 0.6 }, mode = 'bilinear' }) -- 6 x 3 through 1/1.5, 1/0.6
    assert.same({ 2, 2, 6, 3 }, y.shape)
    S.assert_close(y, interpolate_ref(xf, 4, 4, 5, 6, 3, 'bilinear', false, 1.5, 0.6), 1e-12, 1e-12)
    -- torch: [0, 1] to 4 columns is [0, 0.25, 0.75, 1]; with align_corners [0, 1/3, 2/3, 1]
    local row = T.tensor({ { { { 0, 1 } } } }, { dtype = 'float64' })
    S.assert_close(F.interpolate(row, { size = { 1, 4 }, mode = 'bilinear' }), { 0, 0.25, 0.75, 1 }, 1e-15, 0)
    S.assert_close(F.interpolate(row, { size = { 1, 4 }, mode = 'bilinear', align_corners = true }),
      { 0, 1 / 3, 2 / 3, 1 }, 1e-15, 1e-15)
    local y32 = F.interpolate(x:float(), { size = { 7, 3 }, mode = 'bilinear' })
    assert.equal('float32', y32.dtype)
    S.assert_close(y32, F.interpolate(x, { size = { 7, 3 }, mode = 'bilinear' }), 1e-5, 1e-6)
  end)

  it('has gradients for both modes', function()
    for _, c in ipairs {
      { size = { 7, 8 } }, { size = { 2, 3 } }, { scale_factor = 1.5 },
      { size = { 7, 8 }, mode = 'bilinear' }, { size = { 3, 2 }, mode = 'bilinear' },
      { size = { 7, 8 }, mode = 'bilinear', align_corners = true }, { size = { 2, 7 }, mode = 'bilinear', align_corners = true },
      { scale_factor = { 1.5, 0.75 }, mode = 'bilinear' },
    } do
      check_grad('interpolate', function(t) return F.interpolate(t, c) end, { leaf({ 1, 2, 4, 5 }, 51, true) })
    end
  end)

  it('explains bad arguments', function()
    S.assert_error(function() F.interpolate(x, { size = 3, scale_factor = 2 }) end, 'exactly one of size and scale_factor')
    S.assert_error(function() F.interpolate(x, {}) end, 'exactly one of size and scale_factor')
    S.assert_error(function() F.interpolate(x, { size = 3, align_corners = true }) end,
      'align_corners can only be set with the bilinear mode')
    S.assert_error(function() F.interpolate(x, { size = 3, mode = 'bicubic' }) end, "unknown mode 'bicubic'")
    S.assert_error(function() F.interpolate(x, { sizes = 3 }) end, "unknown option 'sizes'", 'align_corners, mode')
    S.assert_error(function() F.interpolate(T.ones({ 2, 3, 4 }), { size = 3 }) end, 'expects a 4-D input', '[2,3,4]')
    S.assert_error(function() F.interpolate(x, { size = { 0, 3 } }) end, 'greater than 0', 'output (H: 0, W: 3)')
    S.assert_error(function() F.interpolate(x, { scale_factor = -1 }) end,
      'scale_factor must be a finite number > 0, got -1')
    S.assert_error(function() F.interpolate(T.ones({ 1, 1, 2, 2 }, { dtype = 'int32' }), { size = 3 }) end,
      'floating point', 'int32')
  end)
end)

-- ---- pad, roll ---------------------------------------------------------------------------------
describe('pad', function()
  it('pads and crops in F.pad order (last dim first), with a value, any dtype', function()
    local x = T.arange(0, 6):reshape(2, 3)
    S.assert_close(F.pad(x, { 1, 2 }), { { 0, 0, 1, 2, 0, 0 }, { 0, 3, 4, 5, 0, 0 } }, 0, 0)
    S.assert_close(F.pad(x, { 0, 0, 1, 0 }, { value = 9 }), { { 9, 9, 9 }, { 0, 1, 2 }, { 3, 4, 5 } }, 0, 0)
    S.assert_close(F.pad(x, { -1, 1, 0, -1 }), { { 1, 2, 0 } }, 0, 0)
    S.assert_close(F.pad(x, { -3, 0 }), T.zeros({ 2, 0 }), 0, 0)
    assert.equal('int64', F.pad(x, { 1, 1 }).dtype)
    local b = F.pad(T.ones({ 1, 1 }, { dtype = 'bool' }), { 1, 0 }, 'constant', 0)
    assert.same({ { false, true } }, b:totable())
    local y = F.pad(S.noncontiguous(rand({ 2, 3, 4 }, 60)), { 1, 1, -1, 2, 1, 0 }, { value = -1 })
    assert.same({ 3, 4, 6 }, y.shape)
    S.assert_close(y[0], T.full({ 4, 6 }, -1), 0, 0)
  end)

  it('has the gradient of pad by the negated amounts', function()
    check_grad('pad', function(t) return F.pad(t, { 1, -1, 2, 0, -1, 1 }, { value = 3 }) end, { leaf({ 3, 4, 5 }, 61, true) })
    check_grad('pad 2-D', function(t) return F.pad(t, { 2, 2 }) end, { leaf({ 2, 3 }, 62) })
  end)

  it('explains bad arguments', function()
    local x = T.ones({ 2, 3 })
    S.assert_error(function() F.pad(x, { 1, 2, 3 }) end, 'padding length must be divisible by 2, got 3')
    S.assert_error(function() F.pad(x, { 1, 1, 1, 1, 1, 1 }) end, 'padding length 6 is too large', '[2,3]')
    S.assert_error(function() F.pad(x, { -2, -2 }) end, 'crops more than the 3 elements of dim 1')
    S.assert_error(function() F.pad(x, { 1, 1 }, { mode = 'reflect' }) end, "only mode 'constant'")
    S.assert_error(function() F.pad(x, { 1, 1 }, { fill = 1 }) end, "unknown option 'fill'", 'mode, value')
  end)
end)

describe('roll', function()
  local function roll_ref(flat, shape, shifts, dims)
    local out, nd, n = {}, #shape, numel(shape)
    for k = 0, n - 1 do
      local idx, rem = {}, k
      for d = nd, 1, -1 do idx[d] = rem % shape[d]; rem = floor(rem / shape[d]) end
      for j, d in ipairs(dims) do idx[d + 1] = (idx[d + 1] + shifts[j]) % shape[d + 1] end
      local dst = 0
      for d = 1, nd do dst = dst * shape[d] + idx[d] end
      out[dst + 1] = flat[k + 1]
    end
    return out
  end

  it('matches torch.roll over dims, negative and large shifts, repeated dims and flattened', function()
    local x, xf = rand({ 3, 4, 5 }, 70)
    S.assert_close(x:roll(1, 0), roll_ref(xf, { 3, 4, 5 }, { 1 }, { 0 }), 0, 0)
    S.assert_close(x:roll({ -1, 7 }, { 1, -1 }), roll_ref(xf, { 3, 4, 5 }, { -1, 7 }, { 1, 2 }), 0, 0)
    S.assert_close(T.roll(x, { 2, 1, -3 }, { 0, 1, 2 }), roll_ref(xf, { 3, 4, 5 }, { 2, 1, -3 }, { 0, 1, 2 }), 0, 0)
    S.assert_close(x:roll({ 1, 1 }, { 2, 2 }), roll_ref(xf, { 3, 4, 5 }, { 2 }, { 2 }), 0, 0)
    S.assert_close(x:roll(3, 2), x:roll(-2, 2), 0, 0)
    S.assert_close(x:roll(4), roll_ref(xf, { 60 }, { 4 }, { 0 }), 0, 0) -- flattened, shape kept
    assert.same({ 3, 4, 5 }, x:roll(4).shape)
    local i = T.arange(0, 6):reshape(2, 3)
    S.assert_close(i:roll(1), { { 5, 0, 1 }, { 2, 3, 4 } }, 0, 0)
    S.assert_close(S.noncontiguous(i):roll(-1, 1), { { 1, 2, 0 }, { 4, 5, 3 } }, 0, 0)
    S.assert_close(T.zeros({ 0, 3 }):roll(1, 0), T.zeros({ 0, 3 }), 0, 0)
  end)

  it('has the gradient of roll by the negated shifts', function()
    check_grad('roll', function(t) return t:roll({ 1, -2 }, { 0, 2 }) end, { leaf({ 3, 2, 4 }, 71, true) })
    check_grad('roll flat', function(t) return t:roll(5) end, { leaf({ 3, 4 }, 72) })
  end)

  it('explains bad arguments', function()
    local x = T.ones({ 2, 3 })
    S.assert_error(function() x:roll({ 1, 2 }, { 0 }) end, 'shifts and dims must align', '2 shifts and 1 dims')
    S.assert_error(function() x:roll({ 1, 2 }) end, 'without dims', 'one shift')
    S.assert_error(function() x:roll(1, 2) end, 'roll', 'dim')
    S.assert_error(function() x:roll({}) end, 'non-empty list')
  end)
end)

-- ---- pixel_shuffle -----------------------------------------------------------------------------
describe('pixel_shuffle and pixel_unshuffle', function()
  it('move channel c r^2 + i r + j to pixel (h r + i, w r + j)', function()
    local N, C, H, W, r = 2, 3, 2, 3, 2
    local x = T.arange(0, N * C * r * r * H * W):reshape(N, C * r * r, H, W)
    local y = F.pixel_shuffle(x, r)
    assert.same({ N, C, H * r, W * r }, y.shape)
    local xv, yv = S.flatten(x:totable()), S.flatten(y:totable())
    for n = 0, N - 1 do
      for c = 0, C - 1 do
        for h = 0, H - 1 do
          for w = 0, W - 1 do
            for i = 0, r - 1 do
              for j = 0, r - 1 do
                local src = ((n * C * r * r + c * r * r + i * r + j) * H + h) * W + w
                local dst = ((n * C + c) * H * r + h * r + i) * W * r + w * r + j
                assert.equal(xv[src + 1], yv[dst + 1])
              end
            end
          end
        end
      end
    end
    S.assert_close(F.pixel_unshuffle(y, r), x, 0, 0)
  end)

  it('round-trip with leading batch dims and unbatched inputs', function()
    local x = rand({ 2, 3, 4, 6, 9 }, 80)
    local u = F.pixel_unshuffle(x, 3)
    assert.same({ 2, 3, 36, 2, 3 }, u.shape)
    S.assert_close(F.pixel_shuffle(u, 3), x, 0, 0)
    local z = rand({ 8, 2, 3 }, 81)
    assert.same({ 2, 4, 6 }, F.pixel_shuffle(z, 2).shape)
    S.assert_close(F.pixel_unshuffle(F.pixel_shuffle(z, 2), 2), z, 0, 0)
  end)

  it('are differentiable through the recorded view ops', function()
    local x = leaf({ 1, 8, 2, 3 }, 82, true)
    local y = F.pixel_shuffle(x, 2)
    assert.is_true(y.requires_grad)
    assert.is_not_nil(y.grad_fn)
    check_grad('pixel_shuffle', function(t) return F.pixel_shuffle(t, 2) end, { x })
    check_grad('pixel_unshuffle', function(t) return F.pixel_unshuffle(t, 2) end, { leaf({ 2, 1, 4, 2 }, 83) })
  end)

  it('explain bad arguments', function()
    S.assert_error(function() F.pixel_shuffle(T.ones({ 1, 6, 2, 2 }), 2) end,
      'channels (6)', 'divisible by upscale_factor^2 = 4')
    S.assert_error(function() F.pixel_unshuffle(T.ones({ 1, 1, 5, 4 }), 2) end, 'height (5)', 'downscale_factor 2')
    S.assert_error(function() F.pixel_shuffle(T.ones({ 4, 2 }), 2) end, 'at least 3 dims')
    S.assert_error(function() F.pixel_shuffle(T.ones({ 1, 4, 2, 2 }), 0) end, 'upscale_factor must be positive')
  end)
end)
