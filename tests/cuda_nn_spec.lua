-- cuda_nn_spec.lua — the nn kernels on CUDA against the CPU: linear (bias fused), layer norm (rows
-- held by a warp and rows of more than 1024 values), batch norm (training with running statistics,
-- evaluation), group norm, softmax / log_softmax over inner and outer dims, cross entropy (class
-- indices with weights, ignore_index and label smoothing; probabilities), MSE / L1 / smooth L1 with
-- every reduction, dropout and drop_path (the same masks as the CPU from the same generator, and
-- their statistics). Forward and backward through autograd, float32/float64/float16/bfloat16, on
-- non-contiguous inputs where the op takes them. Pending without a GPU.
local T = require 'tessera'
local CS = require 'cuda_support'
local F = T.F

-- Tolerances (rtol, atol) of composite ops: float32/float64 errors grow with the length of the
-- sums (`scale`); 16-bit results are rounded last on both devices and may land a few rounding
-- steps apart (about 10 for float16, 5 for bfloat16), whatever the op.
local function tol(dtype, scale)
  scale = scale or 1
  if dtype == 'float16' then return { rtol = 1e-2, atol = 1e-3 } end
  if dtype == 'bfloat16' then return { rtol = 4e-2, atol = 4e-3 } end
  local t = { float32 = { 2e-5, 2e-6 }, float64 = { 1e-11, 1e-12 } }
  return { rtol = t[dtype][1] * scale, atol = t[dtype][2] * scale }
end

local rand = CS.rand

-- A non-contiguous view with x's values (every other column of a wider tensor).
local function strided(x)
  local shape = x.shape
  local last = #shape
  shape[last] = shape[last] * 2
  local wide = T.zeros(shape, { dtype = x.dtype })
  local v = wide:slice(last - 1, 0, nil, 2)
  v:copy_(x)
  return v
end

describe('cuda nn ops match the cpu', function()
  teardown(function() CS.report('nn') end)

  CS.it('linear with and without bias, strided and transposed inputs, and its gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local x, w, b = rand(dtype, 10 + di, { 6, 5, 24 }), rand(dtype, 20 + di, { 16, 24 }), rand(dtype, 30 + di, { 16 })
      CS.check_grad('linear (bias)', F.linear, { x, w, b }, tol(dtype, 4))
      CS.check_grad('linear (no bias)', function(a, c) return F.linear(a, c) end, { x, w }, tol(dtype, 4))
      CS.check_grad('linear (strided input)', F.linear, { strided(x), w, b }, tol(dtype, 4))
      CS.check_grad('linear (transposed weight)', function(a, c, d) return F.linear(a, c:t(), d) end,
        { x, rand(dtype, 40 + di, { 24, 16 }), b }, tol(dtype, 4))
      -- a single row and a single feature
      CS.check_grad('linear (one row)', F.linear, { rand(dtype, 50 + di, { 1, 24 }), w, b }, tol(dtype, 4))
      CS.check_grad('linear (one output)', F.linear, { x, rand(dtype, 60 + di, { 1, 24 }), rand(dtype, 70 + di, { 1 }) },
        tol(dtype, 4))
    end
  end)

  CS.it('layer_norm over short and long rows, with and without affine, and its gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for si, n in ipairs { 7, 96, 768, 1500 } do
        local x = rand(dtype, 100 * di + si, { 5, n }, -3, 5)
        local w, b = rand(dtype, 110 * di + si, { n }, 0.5, 1.5), rand(dtype, 120 * di + si, { n })
        CS.check_grad('layer_norm', function(a, c, d) return F.layer_norm(a, n, c, d, 1e-5) end, { x, w, b }, tol(dtype, 10))
        CS.check_grad('layer_norm (no affine)', function(a) return F.layer_norm(a, n) end, { x }, tol(dtype, 10))
      end
      local x = rand(dtype, 170 + di, { 2, 3, 4, 6 })
      CS.check_grad('layer_norm (2 normalized dims, strided)', function(a, c)
        return F.layer_norm(a, { 4, 6 }, c)
      end, { strided(x), rand(dtype, 180 + di, { 4, 6 }) }, tol(dtype, 10))
    end
  end)

  CS.it('batch_norm in training (running statistics) and evaluation, and its gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for si, shape in ipairs { { 6, 5 }, { 4, 3, 5, 7 }, { 2, 4, 70, 70 } } do
        local c = shape[2]
        local x = rand(dtype, 200 * di + si, shape, -2, 4)
        local w, b = rand(dtype, 210 * di + si, { c }, 0.5, 1.5), rand(dtype, 220 * di + si, { c })
        local rm_c, rv_c = T.zeros(c, { dtype = dtype }), T.ones(c, { dtype = dtype })
        local rm_g, rv_g = rm_c:cuda(), rv_c:cuda()
        -- check_grad calls the op on the cpu inputs, then on the gpu ones: each with its own statistics
        local calls = 0
        local function stats_for(a)
          calls = calls + 1
          local on_gpu = calls % 2 == 0
          assert.equals(on_gpu, a.device ~= 'cpu' or CS.device == 'cpu' and on_gpu)
          if on_gpu then return rm_g, rv_g end
          return rm_c, rv_c
        end
        local function train(a, ww, bb)
          local rm, rv = stats_for(a)
          return F.batch_norm(a, rm, rv, ww, bb, true, 0.1, 1e-5)
        end
        CS.check_grad('batch_norm (training)', train, { x, w, b }, tol(dtype, 10))
        CS.check('batch_norm running_mean', rm_g, rm_c, tol(dtype, 10))
        CS.check('batch_norm running_var', rv_g, rv_c, tol(dtype, 10))
        CS.check_grad('batch_norm (evaluation)', function(a, ww, bb)
          local rm, rv = stats_for(a)
          return F.batch_norm(a, rm, rv, ww, bb, false)
        end, { x, w, b }, tol(dtype, 10))
      end
    end
  end)

  CS.it('group_norm with and without affine, and its gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for si, case in ipairs { { { 3, 6, 5, 4 }, 3 }, { { 2, 8, 9 }, 8 }, { { 2, 4 }, 2 }, { { 2, 32, 12, 12 }, 1 } } do
        local shape, groups = case[1], case[2]
        local x = rand(dtype, 300 * di + si, shape, -2, 3)
        local w, b = rand(dtype, 310 * di + si, { shape[2] }, 0.5, 1.5), rand(dtype, 320 * di + si, { shape[2] })
        CS.check_grad('group_norm', function(a, c, d) return F.group_norm(a, groups, c, d) end, { x, w, b }, tol(dtype, 10))
        CS.check_grad('group_norm (no affine)', function(a) return F.group_norm(a, groups) end, { x }, tol(dtype, 10))
      end
    end
  end)

  CS.it('softmax and log_softmax over inner, outer and long dims, and their gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for si, case in ipairs { { { 6, 10 }, -1 }, { { 4, 9, 5 }, 1 }, { { 7, 3 }, 0 }, { { 3, 2500 }, 1 }, { { 2, 3, 40 }, 2 } } do
        local shape, dim = case[1], case[2]
        local x = rand(dtype, 400 * di + si, shape, -6, 6)
        CS.check_grad('softmax', function(a) return F.softmax(a, dim) end, { x }, tol(dtype, 5))
        CS.check_grad('log_softmax', function(a) return F.log_softmax(a, dim) end, { x }, tol(dtype, 5))
      end
      -- -inf entries (a masked logit) and a strided input
      local x = rand(dtype, 450 + di, { 4, 12 }, -3, 3)
      x[{ 1, 3 }] = -math.huge
      CS.check('softmax (-inf entry)', F.softmax(x:cuda(), 1), F.softmax(x, 1), tol(dtype, 5))
      CS.check_grad('softmax (strided)', function(a) return F.softmax(a, 0) end, { strided(rand(dtype, 460 + di, { 4, 12 }, -3, 3)) },
        tol(dtype, 5))
    end
  end)

  CS.it('cross_entropy with class indices, weights, ignore_index and label smoothing, and its gradient', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for si, shape in ipairs { { 6, 5 }, { 3, 4, 2, 3 }, { 4, 1000 } } do
        local c = shape[2]
        local logits = rand(dtype, 500 * di + si, shape, -4, 4)
        local tshape = { shape[1] }
        for d = 3, #shape do tshape[#tshape + 1] = shape[d] end
        local n = 1
        for _, s in ipairs(tshape) do n = n * s end
        local flat = {}
        for i = 1, n do flat[i] = (i * 7 + si) % c end
        flat[2] = -100 -- an ignored position
        local target = T.tensor(flat, { dtype = 'int64' }):view(tshape)
        local weight = rand(dtype, 510 * di + si, { c }, 0.2, 2)
        for _, reduction in ipairs { 'mean', 'sum', 'none' } do
          for _, o in ipairs { {}, { weight = weight }, { label_smoothing = 0.1 }, { weight = weight, label_smoothing = 0.2 } } do
            local function ce(z, t, w)
              return F.cross_entropy(z, t, { weight = w, label_smoothing = o.label_smoothing, reduction = reduction })
            end
            CS.check_grad('cross_entropy (' .. reduction .. ')', ce, { logits, target, o.weight },
              { fixed = { [2] = true, [3] = true }, rtol = tol(dtype, 20).rtol, atol = tol(dtype, 20).atol })
          end
        end
      end
      -- probabilities as the target: both get gradients
      local logits, probs = rand(dtype, 560 + di, { 5, 7 }), F.softmax(rand(dtype, 570 + di, { 5, 7 }), 1)
      CS.check_grad('cross_entropy (probabilities)', function(z, p)
        return F.cross_entropy(z, p, { label_smoothing = 0.1 })
      end, { logits, probs }, tol(dtype, 20))
    end
  end)

  CS.it('mse, l1 and smooth_l1 with every reduction, broadcasting, and their gradients', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local a, b = rand(dtype, 600 + di, { 5, 7 }, -2, 2), rand(dtype, 610 + di, { 7 }, -2, 2)
      local big_a, big_b = rand(dtype, 620 + di, { 300, 70 }), rand(dtype, 630 + di, { 300, 70 })
      for _, reduction in ipairs { 'mean', 'sum', 'none' } do
        local o = { reduction = reduction }
        CS.check_grad('mse_loss (' .. reduction .. ')', function(x, y) return F.mse_loss(x, y, o) end, { a, b }, tol(dtype, 10))
        CS.check_grad('l1_loss (' .. reduction .. ')', function(x, y) return F.l1_loss(x, y, o) end, { a, b }, tol(dtype, 10))
        CS.check_grad('smooth_l1_loss (' .. reduction .. ')', function(x, y)
          return F.smooth_l1_loss(x, y, { beta = 0.5, reduction = reduction })
        end, { a, b }, tol(dtype, 10))
        CS.check_grad('mse_loss (' .. reduction .. ', large)', function(x, y) return F.mse_loss(x, y, o) end,
          { strided(big_a), big_b }, tol(dtype, 50))
      end
    end
  end)

  CS.it('dropout and drop_path draw the cpu\'s masks from the same generator', function()
    for di, dtype in ipairs(CS.FLOATS) do
      local x = rand(dtype, 700 + di, { 8, 33 })
      for _, p in ipairs { 0.1, 0.5, 0.9 } do
        -- the same mask, and x * scale rounded once on both devices: bit-identical
        CS.check_grad('dropout', function(a)
          return F.dropout(a, p, true, T.Generator(1234))
        end, { x }, { exact = true })
        CS.check_grad('drop_path', function(a)
          return F.drop_path(a, p, true, true, T.Generator(99))
        end, { x }, { exact = true })
      end
      CS.check('dropout (evaluation)', F.dropout(x:cuda(), 0.5, false), F.dropout(x, 0.5, false), { exact = true })
    end
  end)

  CS.it('dropout keeps 1 - p of the values, scaled by 1 / (1 - p)', function()
    local x = T.ones(1000, 1000, { dtype = 'float32' }):cuda()
    for _, p in ipairs { 0.1, 0.3, 0.7 } do
      local y = F.dropout(x, p, true, T.Generator(7))
      local kept = y:ne(0):to('float64'):mean():item()
      -- 1e6 Bernoulli draws: the kept fraction is within 5 standard deviations of 1 - p
      local sd = math.sqrt(p * (1 - p) / 1e6)
      assert(math.abs(kept - (1 - p)) < 5 * sd, string.format('dropout p=%g kept %g', p, kept))
      local scale = 1 / (1 - p)
      assert(math.abs(y:amax():item() - scale) < 1e-6 * scale, 'kept values are scaled by 1 / (1 - p)')
      assert.equals(0, y:amin():item())
    end
  end)
end)
