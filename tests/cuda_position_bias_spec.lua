-- cuda_position_bias_spec.lua — Swin's fused continuous relative position bias
-- (T.F.relative_position_bias) on CUDA against the CPU kernel: Swin stage shapes (windows of 7x7
-- and 8x8 tokens, 32 hidden units, 3 to 24 heads), with and without biases, 1x1-conv weights,
-- strided positions, integer grids (zero differences) and random coordinates; the gradients of
-- positions, weights and biases; sizes whose backward needs more than 48 KB of shared memory and
-- more tiles than the weight-gradient pass has blocks. Every float dtype. Pending without a GPU.
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'
local F = T.F

-- float32/float64 errors grow with the length of the weight-gradient sums (`scale`); 16-bit results
-- are rounded last on both devices and may land a rounding step or two apart.
local function tol(dtype, scale)
  scale = scale or 1
  if dtype == 'float16' then return { rtol = 1e-2, atol = 2e-3 * scale } end
  if dtype == 'bfloat16' then return { rtol = 4e-2, atol = 1e-2 * scale } end
  if dtype == 'float64' then return { rtol = 1e-10, atol = 1e-11 * scale } end
  return { rtol = 1e-4, atol = 1e-5 * scale }
end

local rand = CS.rand

-- Random coordinates [W, C, N]: distinct per token (no zero difference off the diagonal).
local function random_positions(dtype, seed, W, C, N)
  local values = S.randoms(W * C * N, seed, 0, 1)
  for k = 1, #values do values[k] = values[k] * 3 + (k % N) * 3 - 1.5 * N end
  return T.tensor(S.nest(values, { W, C, N }), { dtype = 'float64' }):to(dtype)
end

-- The model's positions: the (row, column) of each token of a side x side window, shifted per window
-- (many zero differences: f(0) = 0 and f'(0) = 0 on both devices).
local function grid_positions(dtype, W, side)
  local values = {}
  for w = 0, W - 1 do
    for c = 0, 1 do
      for t = 0, side * side - 1 do
        local coord = c == 0 and math.floor(t / side) or t % side
        values[#values + 1] = coord + (w % 3) * side
      end
    end
  end
  return T.tensor(S.nest(values, { W, 2, side * side }), { dtype = 'float64' }):to(dtype)
end

local function rpb(pos, w1, b1, w2, b2) return F.relative_position_bias(pos, w1, b1, w2, b2) end
local function rpb_no_bias(pos, w1, w2) return F.relative_position_bias(pos, w1, nil, w2, nil) end

describe('cuda relative_position_bias matches the cpu', function()
  teardown(function() CS.report('relative_position_bias') end)

  CS.it('runs the fused kernel on cuda, not the conv2d composite', function()
    local pos = random_positions('float32', 1, 2, 2, 9):cuda()
    local w1 = rand('float32', 2, { 4, 2 }):cuda():requires_grad_()
    local out = rpb(pos, w1, nil, rand('float32', 3, { 3, 4 }):cuda(), nil)
    assert.equals('relative_position_bias', out.grad_fn)
    assert.equals('cuda:0', out.device)
  end)

  CS.it('Swin windows: 8x8 and 7x7 tokens, 32 hidden units, every gradient', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for _, case in ipairs { { 6, 64, 32, 3 }, { 4, 49, 32, 6 } } do
        local W, N, P, H = unpack(case)
        local pos = random_positions(dtype, 10 + di, W, 2, N)
        local w1, b1 = rand(dtype, 20 + di, { P, 2, 1, 1 }), rand(dtype, 30 + di, { P })
        local w2, b2 = rand(dtype, 40 + di, { H, P, 1, 1 }), rand(dtype, 50 + di, { H })
        CS.check_grad('position_bias (Swin window ' .. N .. ')', rpb, { pos, w1, b1, w2, b2 }, tol(dtype, 16))
        CS.check_grad('position_bias (no biases)', rpb_no_bias, { pos, w1:view(P, 2), w2:view(H, P) }, tol(dtype, 16))
      end
    end
  end)

  CS.it('integer grids with zero differences, strided positions, poisoned outputs', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local pos = grid_positions(dtype, 5, 8)
      local w1, b1, w2, b2 = rand(dtype, 60 + di, { 32, 2 }), rand(dtype, 61 + di, { 32 }),
        rand(dtype, 62 + di, { 12, 32 }), rand(dtype, 63 + di, { 12 })
      CS.check_grad('position_bias (integer grid)', rpb, { pos, w1, b1, w2, b2 }, tol(dtype, 16))
      -- [W, N, C] transposed to [W, C, N], as the model's window partition hands it over
      local strided = random_positions(dtype, 64 + di, 3, 2, 20):transpose(1, 2):contiguous():transpose(1, 2)
      CS.check_grad('position_bias (strided positions)', rpb, { strided, w1, b1, w2, b2 }, tol(dtype, 4))
      -- every output element is written: the allocator hands back a block just filled with NaN
      local size = 5 * 12 * 64 * 64
      CS.poison(T.empty(size, { dtype = dtype, device = 'cuda' })):free()
      local g = rpb(pos:cuda(), w1:cuda(), b1:cuda(), w2:cuda(), b2:cuda())
      CS.check('position_bias (after a poisoned block)', g, rpb(pos, w1, b1, w2, b2), tol(dtype))
    end
  end)

  CS.it('many windows (more tiles than blocks) and wide layers (shared memory past 48 KB)', function()
    for di, dtype in ipairs { 'float32', 'float64', 'bfloat16' } do
      -- 160 windows of 49 tokens: 384160 elements, over 1024 tiles of 256; positions fixed
      local pos = grid_positions(dtype, 160, 7)
      local w1, b1 = rand(dtype, 70 + di, { 32, 2 }), rand(dtype, 71 + di, { 32 })
      local w2, b2 = rand(dtype, 72 + di, { 3, 32 }), rand(dtype, 73 + di, { 3 })
      CS.check_grad('position_bias (160 windows)', rpb, { pos, w1, b1, w2, b2 },
        { fixed = { true }, rtol = tol(dtype).rtol, atol = tol(dtype, 400).atol })
      -- Swin-L's last stage: 64 hidden units, 48 heads
      local wide = random_positions(dtype, 74 + di, 2, 2, 64)
      local v1, c1 = rand(dtype, 75 + di, { 64, 2 }), rand(dtype, 76 + di, { 64 })
      local v2, c2 = rand(dtype, 77 + di, { 48, 64 }), rand(dtype, 78 + di, { 48 })
      CS.check_grad('position_bias (64 hidden, 48 heads)', rpb, { wide, v1, c1, v2, c2 }, tol(dtype, 64))
    end
  end)

  CS.it('gives gradients only where they are wanted, and zero-size inputs', function()
    local pos = random_positions('float32', 80, 2, 2, 16)
    local w1, w2 = rand('float32', 81, { 8, 2 }), rand('float32', 82, { 4, 8 })
    -- only w2 (the backward's hidden-layer pass alone) and only the positions (no weight sums)
    CS.check_grad('position_bias (only w2)', rpb_no_bias, { pos, w1, w2 }, { fixed = { true, true } })
    CS.check_grad('position_bias (only positions)', rpb_no_bias, { pos, w1, w2 }, { fixed = { nil, true, true } })
    local empty = rpb(T.empty(0, 2, 16, { device = 'cuda' }), w1:cuda(), nil, w2:cuda(), nil)
    assert.same({ 0, 4, 16, 16 }, empty.shape)
  end)
end)
