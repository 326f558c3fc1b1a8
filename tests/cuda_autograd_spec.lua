-- cuda_autograd_spec.lua — gradients of the elementwise unary ops on CUDA (the unary_backward
-- entry) against the CPU, forward and backward through autograd, on non-contiguous inputs in every
-- float dtype; plus a small chain mixing elementwise ops, reductions and indexing. Pending without
-- a GPU.
local T = require 'tessera'
local CS = require 'cuda_support'

-- Ops and the input range their derivative is smooth on (log, sqrt, rsqrt, reciprocal need x > 0).
local UNARY = {
  { 'neg' }, { 'abs' }, { 'sign' }, { 'exp', -3, 3 }, { 'expm1', -3, 3 }, { 'log', 0.2, 4 }, { 'log1p', -0.5, 4 },
  { 'sqrt', 0.2, 4 }, { 'rsqrt', 0.2, 4 }, { 'tanh' }, { 'sigmoid' }, { 'erf' }, { 'relu' }, { 'gelu' },
  { 'silu' }, { 'sin' }, { 'cos' }, { 'floor' }, { 'ceil' }, { 'round' }, { 'trunc' }, { 'reciprocal', 0.2, 4 },
  { 'square' },
}

describe('cuda elementwise gradients match the cpu', function()
  teardown(function() CS.report('elementwise gradients') end)

  CS.it('every differentiable unary op, every float dtype, non-contiguous inputs', function()
    for oi, op in ipairs(UNARY) do
      local name, lo, hi = op[1], op[2] or -3, op[3] or 3
      for di, dtype in ipairs(CS.FLOATS) do
        for vi, view in ipairs(CS.VIEWS) do
          if view[1] ~= 'broadcast' then
            local x = view[2](CS.base(dtype, 100 * oi + 10 * di + vi, nil, { specials = false, lo = lo, hi = hi }))
            CS.check_grad(name .. ' backward', function(t) return t[name](t) end, { x })
          end
        end
      end
    end
  end)

  CS.it('a chain of elementwise ops, reductions and indexing', function()
    for _, dtype in ipairs { 'float32', 'float64' } do
      local x = CS.base(dtype, 7, { 6, 10 }, { specials = false })
      local w = CS.base(dtype, 8, { 10 }, { specials = false })
      local idx = T.tensor({ 5, 0, 5, 2 }, { dtype = 'int64' })
      CS.check_grad('chain backward', function(a, b, i)
        local h = (a * b):gelu():index_select(0, i)
        return (h:tanh() + h:sigmoid():log()):sum(1):norm()
      end, { x, w, idx }, { fixed = { [3] = true } })
    end
  end)
end)
