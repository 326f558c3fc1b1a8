-- cuda_conv_spec.lua — the spatial kernels on CUDA against the CPU: conv2d through cuDNN (stride,
-- padding, dilation, groups, depthwise, the patch embedding, 1x1, bias or none, no input channels),
-- avg / max / adaptive pooling (padding, ceil_mode, count_include_pad, dilation, ties and NaN) and
-- interpolate (nearest, bilinear, align_corners, scale factors), forward and backward through
-- autograd in every float dtype. Pending without a GPU.
local T = require 'tessera'
local CS = require 'cuda_support'
local F = T.F

-- float32/float64 errors grow with the length of the sums (`scale`); 16-bit results may land a
-- few rounding steps apart.
local function tol(dtype, scale)
  scale = scale or 1
  if dtype == 'float16' then return { rtol = 1e-2, atol = 2e-3 } end
  if dtype == 'bfloat16' then return { rtol = 4e-2, atol = 8e-3 } end
  local t = { float32 = { 2e-5, 2e-6 }, float64 = { 1e-11, 1e-12 } }
  return { rtol = t[dtype][1] * scale, atol = t[dtype][2] * scale }
end

local rand = CS.rand

-- { name, input shape, weight shape, options }
local CONVS = {
  { '3x3 padded', { 2, 3, 9, 8 }, { 4, 3, 3, 3 }, { padding = 1 } },
  { 'strided', { 2, 3, 11, 10 }, { 5, 3, 3, 3 }, { stride = 2, padding = 1 } },
  { 'asymmetric', { 1, 2, 9, 12 }, { 3, 2, 3, 5 }, { stride = { 2, 1 }, padding = { 0, 2 } } },
  { 'dilated', { 2, 3, 12, 12 }, { 4, 3, 3, 3 }, { dilation = 2, padding = 2 } },
  { 'grouped', { 2, 6, 8, 8 }, { 9, 2, 3, 3 }, { groups = 3, padding = 1 } },
  { 'depthwise', { 2, 8, 10, 10 }, { 8, 1, 3, 3 }, { groups = 8, padding = 1 } },
  { 'depthwise multiplier', { 2, 4, 7, 7 }, { 8, 1, 5, 5 }, { groups = 4, padding = 2, stride = 2 } },
  { 'patch embedding 4x4/4', { 2, 3, 16, 16 }, { 8, 3, 4, 4 }, { stride = 4 } },
  { 'patch merge 2x2/2', { 2, 16, 8, 8 }, { 32, 16, 2, 2 }, { stride = 2 } },
  { '1x1', { 2, 16, 5, 6 }, { 7, 16, 1, 1 }, {} },
  { 'kernel as large as the input', { 2, 3, 5, 5 }, { 4, 3, 5, 5 }, {} },
}

describe('cuda spatial ops match the cpu', function()
  teardown(function() CS.report('spatial') end)

  CS.it('conv2d of every geometry, with and without bias, and its gradients', function()
    for ci, case in ipairs(CONVS) do
      local name, xs, ws, opts = case[1], case[2], case[3], case[4]
      for di, dtype in ipairs(CS.FLOATS) do
        local x, w, b = rand(dtype, 10 * ci + di, xs), rand(dtype, 20 * ci + di, ws), rand(dtype, 30 * ci + di, { ws[1] })
        local k = ws[2] * ws[3] * ws[4]
        CS.check_grad('conv2d (' .. name .. ')', function(a, c, d) return F.conv2d(a, c, d, opts) end, { x, w, b },
          tol(dtype, k))
        CS.check_grad('conv2d (' .. name .. ', no bias)', function(a, c) return F.conv2d(a, c, opts) end, { x, w },
          tol(dtype, k))
      end
    end
  end)

  CS.it('conv2d of a frozen layer and of an input that needs no gradient', function()
    local x, w, b = rand('float32', 1, { 2, 3, 8, 8 }), rand('float32', 2, { 4, 3, 3, 3 }), rand('float32', 3, { 4 })
    CS.check_grad('conv2d (frozen weight)', function(a, c, d) return F.conv2d(a, c, d, { padding = 1 }) end, { x, w, b },
      { fixed = { [2] = true, [3] = true }, rtol = 1e-4, atol = 1e-5 })
    CS.check_grad('conv2d (fixed input)', function(a, c, d) return F.conv2d(a, c, d, { padding = 1 }) end, { x, w, b },
      { fixed = { [1] = true }, rtol = 1e-4, atol = 1e-5 })
  end)

  CS.it('conv2d with TF32 allowed stays within TF32 rounding', function()
    local x, w = rand('float32', 5, { 2, 16, 12, 12 }), rand('float32', 6, { 16, 16, 3, 3 })
    local want = F.conv2d(x, w, { padding = 1 })
    local previous = T.cuda.allow_tf32(true)
    local ok, err = pcall(function()
      CS.check('conv2d (tf32)', F.conv2d(x:cuda(), w:cuda(), { padding = 1 }), want, { rtol = 1e-2, atol = 2e-2 })
    end)
    T.cuda.allow_tf32(previous)
    assert(ok, err)
  end)

  CS.it('avg_pool2d with padding, ceil_mode and count_include_pad, and its gradient', function()
    local cases = {
      { 2, {} }, { 3, { stride = 2, padding = 1 } }, { 3, { stride = 2, padding = 1, count_include_pad = false } },
      { { 3, 2 }, { stride = { 2, 1 }, ceil_mode = true } }, { 3, { stride = 2, padding = 1, ceil_mode = true, count_include_pad = false } },
    }
    for pi, case in ipairs(cases) do
      for di, dtype in ipairs(CS.FLOATS) do
        local x = rand(dtype, 100 * pi + di, { 2, 3, 9, 8 })
        CS.check_grad('avg_pool2d', function(a) return F.avg_pool2d(a, case[1], case[2]) end, { x }, tol(dtype, 4))
      end
    end
  end)

  CS.it('max_pool2d with padding, dilation, ceil_mode, ties and NaN, and its gradient', function()
    local cases = {
      { 2, {} }, { 3, { stride = 2, padding = 1 } }, { 3, { stride = 1, padding = 1 } },
      { 3, { stride = 2, dilation = 2, padding = 2 } }, { { 2, 3 }, { stride = { 2, 1 }, ceil_mode = true } },
    }
    for pi, case in ipairs(cases) do
      for di, dtype in ipairs(CS.FLOATS) do
        local x = rand(dtype, 200 * pi + di, { 2, 3, 9, 8 })
        -- exact: the same cell wins on both devices, and its gradient is g summed
        CS.check_grad('max_pool2d', function(a) return F.max_pool2d(a, case[1], case[2]) end, { x }, tol(dtype))
        -- ties (a constant plane) and a NaN: the cpu's first maximum, and NaN propagating
        local tied = x:clone()
        tied:select(1, 0):fill_(0.25)
        tied[{ 1, 2, 4, 4 }] = 0 / 0
        CS.check('max_pool2d (ties, NaN)', F.max_pool2d(tied:cuda(), case[1], case[2]), F.max_pool2d(tied, case[1], case[2]),
          { exact = true })
      end
    end
  end)

  CS.it('adaptive_avg_pool2d to smaller, equal and larger sizes, and its gradient', function()
    for si, size in ipairs { { 1, 1 }, { 3, 3 }, { 4, 5 }, { 9, 8 }, { 13, 11 } } do
      for di, dtype in ipairs(CS.FLOATS) do
        local x = rand(dtype, 300 * si + di, { 2, 3, 9, 8 })
        CS.check_grad('adaptive_avg_pool2d', function(a) return F.adaptive_avg_pool2d(a, size) end, { x }, tol(dtype, 8))
      end
    end
  end)

  CS.it('interpolate nearest and bilinear, sizes and scale factors, and its gradient', function()
    local cases = {
      { mode = 'nearest', size = { 14, 12 } }, { mode = 'nearest', scale_factor = 2 }, { mode = 'nearest', size = { 4, 5 } },
      { mode = 'nearest', scale_factor = { 1.5, 0.5 } },
      { mode = 'bilinear', size = { 14, 12 } }, { mode = 'bilinear', size = { 14, 12 }, align_corners = true },
      { mode = 'bilinear', scale_factor = 2 }, { mode = 'bilinear', size = { 3, 5 } },
      { mode = 'bilinear', size = { 1, 1 }, align_corners = true }, { mode = 'bilinear', scale_factor = { 2.5, 1.25 } },
    }
    for ci, opts in ipairs(cases) do
      for di, dtype in ipairs(CS.FLOATS) do
        local x = rand(dtype, 400 * ci + di, { 2, 3, 7, 6 })
        CS.check_grad('interpolate (' .. opts.mode .. ')', function(a) return F.interpolate(a, opts) end, { x }, tol(dtype, 8))
      end
    end
  end)

  CS.it('conv, pool and interpolate are bit-identical run to run', function()
    local x, w = rand('float32', 9, { 2, 8, 16, 16 }):cuda(), rand('float32', 10, { 8, 8, 3, 3 }):cuda()
    local y = F.conv2d(x, w, { padding = 1 })
    CS.check('conv2d (repeat)', F.conv2d(x, w, { padding = 1 }), y, { exact = true })
    local function conv_grads() -- y as the upstream gradient
      local xg, wg = x:detach():requires_grad_(), w:detach():requires_grad_()
      local loss = (F.conv2d(xg, wg, { padding = 1 }) * y):sum()
      loss:backward()
      return xg.grad, wg.grad
    end
    local gx, gw = conv_grads()
    local gx2, gw2 = conv_grads()
    CS.check('conv2d grad input (repeat)', gx2, gx, { exact = true })
    CS.check('conv2d grad weight (repeat)', gw2, gw, { exact = true })
    CS.check('avg_pool2d (repeat)', F.avg_pool2d(y, 3, { stride = 1, padding = 1 }), F.avg_pool2d(y, 3, { stride = 1, padding = 1 }),
      { exact = true })
    CS.check('interpolate (repeat)', F.interpolate(y, { mode = 'bilinear', scale_factor = 2 }),
      F.interpolate(y, { mode = 'bilinear', scale_factor = 2 }), { exact = true })
  end)
end)
