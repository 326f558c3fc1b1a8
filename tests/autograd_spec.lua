-- autograd_spec.lua — the tape engine and the gradients of the tensor ops, each checked against
-- float64 central differences (T.gradcheck: eps 1e-6, |analytical - numerical| <= 1e-5 + 1e-3 |numerical|).
local T = require 'tessera'
local S = require 'support'

local leaf, check = S.grad_leaf, S.gradcheck

describe('the tape', function()
  it('accumulates into leaves, reducing broadcast dims', function()
    local a = leaf({ 2, 3 }, 1)
    local b = leaf({ 3 }, 2)
    local y = (a * b):sum()
    y:backward()
    S.assert_close(a.grad, b:detach():expand(2, 3):contiguous(), 1e-15)
    S.assert_close(b.grad, a:detach():sum(0), 1e-15)
    assert.equal('sum', y.grad_fn)
    assert.is_true(a.is_leaf); assert.is_false(y.is_leaf)
  end)

  it('adds gradients over two backward passes and through shared subexpressions', function()
    local x = leaf({ 4 }, 3)
    local h = x * 2
    local y = (h * h + h):sum() -- h used three times
    y:backward()
    local expected = (x:detach() * 8 + 2)
    S.assert_close(x.grad, expected, 1e-14)
    ;(x * 3):sum():backward()
    S.assert_close(x.grad, expected + 3, 1e-14)
    x.grad = nil
    assert.is_nil(x.grad)
  end)

  it('refuses a second backward through freed saved tensors unless retain_graph', function()
    local x = leaf({ 3 }, 4)
    local y = (x * x):sum()
    y:backward({ retain_graph = true })
    y:backward()
    S.assert_close(x.grad, x:detach() * 4, 1e-14)
    S.assert_error(function() y:backward() end, 'second time', 'retain_graph')
  end)

  it('detects a saved tensor modified in place instead of giving a wrong gradient', function()
    local x = leaf({ 3 }, 5)
    local h = x * 1
    local y = h * h
    h:add_(1)
    S.assert_error(function() y:sum():backward() end, 'modified by an in-place operation')
  end)

  it('differentiates in-place ops on non-leaves through their new history', function()
    local x = leaf({ 3 }, 6)
    local h = x * 2
    h:add_(1):mul_(3):exp_()
    h:sum():backward()
    S.assert_close(x.grad, ((x:detach() * 2 + 1) * 3):exp() * 6, 1e-12)
  end)

  it('refuses in-place writes to leaves that require grad, and to views of graph tensors', function()
    local w = leaf({ 3 }, 7)
    S.assert_error(function() w:add_(1) end, 'leaf tensor that requires grad')
    T.no_grad(function() w:add_(1) end) -- optimizers update leaves like this
    local h = w * 1
    S.assert_error(function() h[0]:fill_(0) end, 'view')
  end)

  it('no_grad records nothing; detach cuts the graph', function()
    local x = leaf({ 2 }, 8)
    local y = T.no_grad(function() return x * 2 end)
    assert.is_false(y.requires_grad)
    assert.is_true(T.is_grad_enabled())
    local d = x:detach()
    assert.is_false(d.requires_grad)
    assert.is_true(d:shares_storage(x))
    S.assert_error(function() T.no_grad(function() error('boom') end) end, 'boom')
    assert.is_true(T.is_grad_enabled())
  end)

  it('explains bad requests', function()
    S.assert_error(function() T.ones(2, { dtype = 'int64' }):requires_grad_() end, 'only floating point')
    S.assert_error(function() leaf({ 2 }, 1):mul(2):backward() end, 'one-element outputs')
    S.assert_error(function() T.ones(2):sum():backward() end, 'does not require grad')
    S.assert_error(function() leaf({ 2 }, 1):mul(2):backward(T.ones(3)) end, 'does not match')
    S.assert_error(function() leaf({ 2 }, 1):as_strided({ 2 }, { 1 }) end, 'not differentiable')
  end)

  it('walks a 20000-op chain without recursion', function()
    local x = leaf({ 1 }, 9)
    local y = x
    for _ = 1, 20000 do y = y + 1 end
    y:sum():backward()
    assert.equal(1, x.grad:item())
    y = nil
    collectgarbage()
  end)

  it('keeps the gradient in the dtype of each input', function()
    local x = T.ones(3, { dtype = 'float32' }):requires_grad_()
    local y = (x:double() * 2):sum()
    y:backward()
    assert.equal('float32', x.grad.dtype)
    S.assert_close(x.grad, { 2, 2, 2 })
  end)
end)

describe('gradients of elementwise ops', function()
  local positive = { log = true, sqrt = true, rsqrt = true, log1p = true, reciprocal = true }
  local ops = { 'neg', 'abs', 'exp', 'expm1', 'log', 'log1p', 'sqrt', 'rsqrt', 'tanh', 'sigmoid', 'erf', 'relu',
    'gelu', 'silu', 'sin', 'cos', 'reciprocal', 'square' }
  for _, name in ipairs(ops) do
    it(name, function()
      -- values avoid the kinks of abs and relu at 0
      local x = positive[name] and leaf({ 2, 3 }, 11, 0.2, 2, true) or leaf({ 2, 3 }, 11, -2, 2, true)
      check(name, function(t) return t[name](t) end, { x })
    end)
  end

  it('binary arithmetic with broadcasting and strided inputs', function()
    local a, b = leaf({ 3, 1, 4 }, 12, 0.5, 2, true), leaf({ 2, 4 }, 13, 0.5, 2)
    for _, name in ipairs { 'add', 'sub', 'mul', 'div', 'pow', 'atan2', 'remainder' } do
      check(name, function(x, y) return x[name](x, y) end, { a, b })
    end
  end)

  it('maximum and minimum (away from ties)', function()
    local a, b = leaf({ 5 }, 14), leaf({ 5 }, 15)
    check('maximum', function(x, y) return x:maximum(y) end, { a, b })
    check('minimum', function(x, y) return x:minimum(y) end, { a, b })
  end)

  it('scalar operands on either side', function()
    local a = leaf({ 4 }, 16, 0.5, 2)
    check('scalar ops', function(x) return (2 - x) * 3 + x / 4 + 2 ^ x + x ^ 3 + 1 / x end, { a })
  end)

  it('where and clamp', function()
    local a, b = leaf({ 2, 3 }, 17), leaf({ 3 }, 18)
    local cond = T.tensor{ { true, false, true }, { false, false, true } }
    check('where', function(x, y) return T.where(cond, x, y) end, { a, b })
    local c = leaf({ 6 }, 19, -2, 2)
    check('clamp', function(x) return x:clamp(-0.7, 0.9) end, { c })
  end)
end)

describe('gradients of views and copies', function()
  it('view, reshape, permute, transpose, t', function()
    local a = leaf({ 2, 3, 4 }, 21, -1, 1, true)
    check('view chain', function(x)
      return x:reshape(6, 4):t():contiguous():view(4, 2, 3):permute(2, 0, 1):transpose(0, 1) * T.arange(24):view(4, 3, 2):double()
    end, { a })
  end)

  it('slice with step, narrow, select and indexing', function()
    local a = leaf({ 4, 5 }, 22)
    check('slice', function(x) return x:slice(1, 1, nil, 2) * 2 + x:narrow(0, 1, 2):select(1, -1):unsqueeze(0) end, { a })
    check('index', function(x) return x[{ { 1, 3 }, 2 }]:sum() + x[-1] end, { a })
  end)

  it('expand, squeeze, unsqueeze, flatten', function()
    local a = leaf({ 3, 1 }, 23)
    check('expand', function(x) return x:expand(2, 3, 4):flatten() * T.arange(24):double() end, { a })
    check('squeeze', function(x) return x:squeeze(1):unsqueeze(0):squeeze() * 3 end, { a })
  end)

  it('dtype and copy conversions pass the gradient back', function()
    local a = leaf({ 3 }, 24)
    check('to', function(x) return x:float():double() * 2 end, { a }, { eps = 1e-3 }) -- float32 needs a wider step
    check('clone', function(x) return x:clone() * x end, { a })
    local target = T.zeros(2, 3, { dtype = 'float64' })
    check('copy_', function(x)
      local t = target:clone()
      t:copy_(x)
      return t * 2
    end, { a })
  end)
end)

describe('gradients of reductions', function()
  it('sum and mean over dim sets, keepdim or not', function()
    local a = leaf({ 2, 3, 4 }, 31, -1, 1, true)
    check('sum all', function(x) return x:sum() end, { a })
    check('sum dims', function(x) return x:sum({ 0, 2 }) end, { a })
    check('mean keepdim', function(x) return x:mean(1, true) * x end, { a })
  end)

  it('prod, including zeros', function()
    local a = leaf({ 2, 3 }, 32, 0.5, 1.5)
    check('prod', function(x) return x:prod(1) end, { a })
    local z = T.tensor({ { 0, 2, 3 }, { 0, 0, 4 } }, { dtype = 'float64' }):requires_grad_()
    z:prod(1):sum():backward()
    S.assert_close(z.grad, { { 6, 0, 0 }, { 0, 0, 0 } })
  end)

  it('amax, amin, max and min along a dim', function()
    local a = leaf({ 3, 4 }, 33)
    check('amax', function(x) return x:amax(1) end, { a })
    check('amin', function(x) return x:amin() end, { a })
    check('max dim', function(x) return (x:max(0)) end, { a })
    check('min dim keepdim', function(x) return (x:min(1, true)) * 2 end, { a })
  end)

  it('amax shares the gradient among ties', function()
    local x = T.tensor({ 1, 3, 3 }, { dtype = 'float64' }):requires_grad_()
    x:amax():backward()
    S.assert_close(x.grad, { 0, 0.5, 0.5 })
  end)

  it('var, std and norms', function()
    local a = leaf({ 3, 4 }, 34)
    check('var', function(x) return x:var(1) end, { a })
    check('var biased', function(x) return x:var{ dim = 0, unbiased = false } end, { a })
    check('std', function(x) return x:std() end, { a })
    check('norm 2', function(x) return x:norm() end, { a })
    check('norm 3 dim', function(x) return x:norm(3, 1) end, { a })
    check('norm 1', function(x) return x:norm(1, 0) end, { a })
    check('norm inf', function(x) return x:norm(math.huge, 1) end, { a })
  end)
end)

describe('gradients at the edges', function()
  it('norms with p < 1 give 0, not NaN, at zero elements (as PyTorch)', function()
    local x = T.tensor({ 0, 1, 4 }, { dtype = 'float64' }):requires_grad_()
    x:norm(0.5):backward()
    S.assert_close(x.grad, { 0, 3, 1.5 }, 1e-12)
  end)
end)

describe('in-place writes and views', function()
  it('refuses to write a graph tensor in place while views of it are in the graph', function()
    local x = T.tensor({ 1, 2, 3 }, { dtype = 'float64' }):requires_grad_()
    local y = x * 1
    local v = y:view(3)
    S.assert_error(function() y:add_(x) end, 'add', 'viewed by tensors in the autograd graph', 'clone()')
    v = nil
    collectgarbage()
    y:add_(x) -- the view is gone: allowed again
    y:sum():backward()
    S.assert_close(x.grad, { 2, 2, 2 })
  end)

  it('refuses to write a value that requires grad into a view of a tensor outside the graph', function()
    local w = T.tensor({ 1, 2 }, { dtype = 'float64' }):requires_grad_()
    local buf = T.zeros({ 4 }, { dtype = 'float64' })
    S.assert_error(function() buf:slice(0, 0, 2):copy_(w) end, 'copy_', 'would lose the gradient')
    S.assert_error(function() buf:slice(0, 0, 2):add_(w) end, 'would lose the gradient')
    T.no_grad(function() buf:slice(0, 0, 2):copy_(w) end) -- no gradient recorded: fine
    assert.same({ 1, 2, 0, 0 }, buf:totable())
  end)
end)

describe('in-place ops on graph tensors', function()
  it('name the op when the result does not fit, and refuse comparisons in place', function()
    local y = T.ones({ 3 }, { dtype = 'float64' }):requires_grad_() * 1
    S.assert_error(function() T.zeros(3):add_(T.ones(2, 3):requires_grad_()) end, 'add_', 'does not fit')
    S.assert_error(function() y:gt_(1) end, 'gt_', 'use gt() out of place')
    S.assert_error(function() y:isnan_() end, 'isnan_', 'out of place')
  end)
end)
