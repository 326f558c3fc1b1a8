-- autograd_ops_spec.lua — gradients of matmul/bmm, joining, gathering and scattering, masks,
-- advanced indexing, index_put_, sort and topk, each checked against float64 central differences
-- (T.gradcheck), and the version counter of their in-place forms.
local T = require 'tessera'
local S = require 'support'

local leaf, check = S.grad_leaf, S.gradcheck

local function long(x) return T.tensor(x, { dtype = 'int64' }) end

-- A [n, m] float64 leaf seen through a transpose: non-contiguous in both matrix dims' sense.
local function transposed_leaf(n, m, seed)
  return T.tensor(S.nest(S.randoms(n * m, seed), { m, n }), { dtype = 'float64' }):t():requires_grad_()
end

describe('matmul and bmm gradients', function()
  it('every rank combination of 1-D and 2-D operands', function()
    local v3, w3 = leaf({ 3 }, 1), leaf({ 3 }, 2, -1, 1, true)
    local m23, m34 = leaf({ 2, 3 }, 3, -1, 1, true), transposed_leaf(3, 4, 4)
    check('dot', function(a, b) return a:matmul(b) end, { v3, w3 })
    check('vector @ matrix', function(a, b) return a:matmul(b) end, { v3, m34 })
    check('matrix @ vector', function(a, b) return a:matmul(b) end, { m23, w3 })
    check('matrix @ matrix', function(a, b) return a:matmul(b) end, { m23, m34 })
    check('mm, mv, dot', function(a, b, v) return a:mm(b):sum(1) + a:mv(v) + v:dot(v) end, { m23, m34, w3 })
    assert.equal('matmul', m23:matmul(m34).grad_fn)
  end)

  it('batched operands against vectors and matrices without batch dims', function()
    local x = leaf({ 2, 3, 4 }, 5, -1, 1, true)
    local w, v = transposed_leaf(4, 5, 6), leaf({ 4 }, 7)
    local u = leaf({ 3 }, 8)
    check('linear: [B,n,k] @ [k,m]', function(a, b) return a:matmul(b) end, { x, w })
    check('[B,n,k] @ [k]', function(a, b) return a:matmul(b) end, { x, v })
    check('[n] @ [B,n,k]', function(a, b) return a:matmul(b) end, { u, x })
    check('[n,k] @ [B,k,m]', function(a, b) return a:matmul(b) end, { leaf({ 5, 3 }, 9), x })
  end)

  it('broadcast batch dims on both sides, summed back over the broadcast dims', function()
    local a = leaf({ 2, 1, 3, 4 }, 10, -1, 1, true)
    local b = leaf({ 3, 4, 2 }, 11)
    check('[2,1,n,k] @ [3,k,m]', function(x, y) return x:matmul(y) end, { a, b })
    local c = leaf({ 1, 3, 2, 4 }, 12)
    local d = leaf({ 2, 1, 4, 3 }, 13, -1, 1, true)
    check('[1,3,n,k] @ [2,1,k,m]', function(x, y) return x:matmul(y) end, { c, d })
    local e = leaf({ 1, 2, 3 }, 14)
    check('[1,n,k] @ [4,k,m] with a permuted right operand', function(x, y)
      return x:matmul(y:permute(0, 2, 1))
    end, { e, leaf({ 4, 5, 3 }, 15) })
    -- gradients have the operand's own shape
    local p, q = leaf({ 1, 2, 3 }, 16), leaf({ 5, 3, 2 }, 17)
    p:matmul(q):sum():backward()
    assert.same({ 1, 2, 3 }, p.grad.shape)
    assert.same({ 5, 3, 2 }, q.grad.shape)
    -- the broadcast operand's gradient is the sum over the batch of the per-batch gradients
    local expected = T.zeros(2, 3, { dtype = 'float64' })
    for i = 0, 4 do expected = expected + T.ones(2, 2, { dtype = 'float64' }):matmul(q:detach()[i]:t()) end
    S.assert_close(p.grad[0], expected, 1e-12)
  end)

  it('only the operands that require grad get one, and float32 works', function()
    local a = leaf({ 2, 3 }, 18)
    local b = T.tensor(S.nest(S.randoms(6, 19), { 3, 2 }), { dtype = 'float64' })
    a:matmul(b):sum():backward()
    S.assert_close(a.grad, T.ones(2, 2, { dtype = 'float64' }):matmul(b:t()), 1e-12)
    assert.is_nil(b.grad)
    local f = T.ones(2, 3):requires_grad_()
    local g = T.ones(3, 4):requires_grad_()
    f:matmul(g):sum():backward()
    assert.equal('float32', f.grad.dtype)
    S.assert_close(f.grad, T.full({ 2, 3 }, 4))
    S.assert_close(g.grad, T.full({ 3, 4 }, 2))
  end)

  it('bmm, with transposed operands', function()
    local a = leaf({ 2, 3, 4 }, 20, -1, 1, true)
    local b = leaf({ 2, 5, 4 }, 21)
    check('bmm', function(x, y) return x:bmm(y:transpose(1, 2)) end, { a, b })
    assert.equal('bmm', a:bmm(b:transpose(1, 2)).grad_fn)
  end)
end)

describe('joining gradients', function()
  it('cat along any dim, non-contiguous inputs, a constant input', function()
    local a, b = leaf({ 2, 3 }, 31, -1, 1, true), leaf({ 2, 1 }, 32)
    local c = T.ones(2, 2, { dtype = 'float64' })
    check('cat dim 1', function(x, y) return T.cat({ x, c, y }, 1) end, { a, b })
    check('cat dim -2', function(x) return T.cat({ x, x * 2 }, -2) end, { a })
    assert.equal('cat', T.cat({ a, b }, 1).grad_fn)
  end)

  it('cat gives each input its own dtype back and skips legacy empty tensors', function()
    local f = T.ones(2, { dtype = 'float32' }):requires_grad_()
    local d = T.ones(3, { dtype = 'float64' }):requires_grad_()
    local empty = T.zeros(0, { dtype = 'float64' }):requires_grad_()
    local m = T.ones(2, 2, { dtype = 'float64' }):requires_grad_()
    local y = T.cat({ f, d })
    assert.equal('float64', y.dtype)
    ;(y * T.arange(5):double()):sum():backward()
    assert.equal('float32', f.grad.dtype)
    S.assert_close(f.grad, { 0, 1 })
    S.assert_close(d.grad, { 2, 3, 4 })
    ;(T.cat({ m, empty }, 1) * 3):sum():backward()
    S.assert_close(m.grad, T.full({ 2, 2 }, 3))
    assert.same({ 0 }, empty.grad.shape)
  end)

  it('stack along a new dim, negative dims included', function()
    local a, b = leaf({ 2, 3 }, 33, -1, 1, true), leaf({ 2, 3 }, 34)
    check('stack 0', function(x, y) return T.stack({ x, y, x }) end, { a, b })
    check('stack -1', function(x, y) return T.stack({ x, y }, -1) end, { a, b })
    assert.equal('stack', T.stack({ a, b }, 1).grad_fn)
  end)
end)

describe('gathering and scattering gradients', function()
  it('index_select accumulates over duplicate indices, along any dim', function()
    local a = leaf({ 4, 3 }, 41, -1, 1, true)
    check('index_select 0', function(x) return x:index_select(0, long{ 3, 0, 3, 3, -1 }) end, { a })
    check('index_select 1', function(x) return x:index_select(-1, T.tensor({ 2, 2, 0 }, { dtype = 'int32' })) end, { a })
    check('index_select 0-d index', function(x) return x:index_select(1, long(1)) end, { a })
    local s = T.tensor(2.5, { dtype = 'float64' }):requires_grad_()
    s:index_select(0, long{ 0 }):backward()
    assert.equal(1, s.grad:item())
    local v = leaf({ 3 }, 42)
    v:index_select(0, long{ 1, 1, 1, 2 }):sum():backward()
    S.assert_close(v.grad, { 0, 3, 1 })
  end)

  it('gather scatters back with scatter_add, duplicates adding up', function()
    local a = leaf({ 3, 4 }, 43, -1, 1, true)
    check('gather 1', function(x) return x:gather(1, long{ { 0, 0, 3 }, { 1, 1, 1 }, { 2, 3, 2 } }) end, { a })
    check('gather 0', function(x) return x:gather(0, long{ { 2, 0, 2, 2 }, { 2, 1, 0, 0 } }) end, { a })
  end)

  it('scatter replaces: overwritten elements of the input get no gradient, src gets gather(g)', function()
    local a = leaf({ 3, 5 }, 44, -1, 1, true)
    local src = leaf({ 2, 5 }, 45)
    local idx = long{ { 0, 1, 2, 0, 1 }, { 2, 0, 1, 1, 0 } } -- no duplicates within a column
    check('scatter', function(x, s) return x:scatter(0, idx, s) end, { a, src })
    -- src larger than index: the unused part of src gets 0
    local big = leaf({ 3, 6 }, 46)
    check('scatter, larger src', function(x, s) return x:scatter(0, idx, s) end, { a, big })
    local y = T.zeros(3, 5, { dtype = 'float64' }):requires_grad_()
    y:scatter(0, idx, 7):sum():backward()
    S.assert_close(y.grad, { { 0, 0, 1, 0, 0 }, { 1, 0, 0, 0, 0 }, { 0, 1, 0, 1, 1 } })
  end)

  it('scatter_add passes g to the input and gather(g) to src, with duplicates', function()
    local a = leaf({ 3, 4 }, 47)
    local src = leaf({ 3, 4 }, 48, -1, 1, true)
    local idx = long{ { 0, 0, 3, 3 }, { 1, 1, 1, 2 }, { 3, 0, 0, 0 } }
    check('scatter_add', function(x, s) return x:scatter_add(1, idx, s) end, { a, src })
    assert.equal('scatter_add', a:scatter_add(1, idx, src).grad_fn)
  end)

  it('in-place scatter_ and scatter_add_ on non-leaves record the same gradients', function()
    local a, src = leaf({ 3, 5 }, 49), leaf({ 2, 5 }, 50)
    local idx = long{ { 0, 1, 2, 0, 1 }, { 2, 0, 1, 1, 0 } }
    check('scatter_', function(x, s)
      local t = x * 1
      t:scatter_(0, idx, s)
      return t * t
    end, { a, src })
    check('scatter_add_', function(x, s)
      local t = x * 1
      t:scatter_add_(0, idx, s):scatter_add_(0, idx, s)
      return t
    end, { a, src })
    -- a constant tensor that src is scattered into joins the graph
    local base = T.zeros(3, 5, { dtype = 'float64' })
    base:scatter_(0, idx, src)
    assert.is_true(base.requires_grad)
    assert.equal('scatter', base.grad_fn)
  end)
end)

describe('mask gradients', function()
  it('masked_fill zeroes g where masked, with mask and tensor broadcasting', function()
    local a = leaf({ 3, 4 }, 61, -1, 1, true)
    local mask = T.tensor{ true, false, false, true }
    check('masked_fill', function(x) return x:masked_fill(mask, 2.5) end, { a })
    local col = leaf({ 3, 1 }, 62)
    local m2 = T.tensor{ { true, false }, { false, false }, { true, true } }
    check('masked_fill broadcast tensor', function(x) return x:masked_fill(m2, -1) end, { col })
    check('masked_fill_', function(x)
      local t = x * 1
      t:masked_fill_(mask, 0)
      return t * t
    end, { a })
  end)

  it('masked_select puts g back at the mask positions, summing broadcast dims', function()
    local a = leaf({ 3, 4 }, 63, -1, 1, true)
    local mask = a:detach():gt(0)
    check('masked_select', function(x) return x:masked_select(mask) end, { a })
    local row = leaf({ 4 }, 64)
    local m = T.tensor{ { true, false, true, true }, { false, true, true, false } }
    check('masked_select broadcast', function(x) return x:masked_select(m) end, { row })
    row.grad = nil
    row:masked_select(m):sum():backward()
    S.assert_close(row.grad, { 1, 1, 2, 1 })
  end)
end)

describe('advanced indexing gradients', function()
  it('index tensors on leading dims accumulate over duplicates', function()
    local a = leaf({ 4, 3, 2 }, 71, -1, 1, true)
    check('t[idx]', function(x) return x[long{ 3, 0, 3, -1 }] end, { a })
    check('t[{i, j}] broadcast', function(x) return x[{ long{ { 0 }, { 3 } }, long{ 2, 2, 0 } }] end, { a })
    check('t[{_, idx}] in place', function(x) return x[{ {}, long{ 1, 1 } }] end, { a })
    check('t[{i, _, k}] apart', function(x) return x[{ long{ 1, 1 }, {}, long{ 0, 0 } }] end, { a })
    assert.equal('index', a[long{ 0 }].grad_fn)
  end)

  it('bool masks, 0-d bool indices and many index tensors', function()
    local a = leaf({ 3, 4 }, 72, -1, 1, true)
    local m = T.tensor{ { true, false, true, false }, { false, false, false, true }, { true, true, false, false } }
    check('t[mask]', function(x) return x[m] end, { a })
    check('t[row mask]', function(x) return x[T.tensor{ true, false, true }] end, { a })
    local yes = T.tensor(true)
    check('t[true]', function(x) return x[yes] end, { a })
    -- more index tensors than a node saves one by one
    local b = leaf({ 2, 2, 2, 2, 2, 2, 2 }, 73)
    local i = long{ 1, 0, 1 }
    check('7 index tensors', function(x) return x[{ i, i, i, i, i, i, long{ 0, 1, 0 } }] end, { b })
  end)

  it('index_put_: replaced elements get no gradient, values get g at their positions', function()
    local a = leaf({ 4, 3 }, 74, -1, 1, true)
    local v = leaf({ 2, 3 }, 75)
    local idx = long{ 2, 0 }
    check('index_put_', function(x, y)
      local t = x * 1
      t:index_put_({ idx }, y)
      return t * t
    end, { a, v })
    local row = leaf({ 3 }, 76) -- broadcast to the indexed shape [2, 3]: its gradient sums over rows
    check('index_put_ broadcast values', function(x, y) return x:index_put({ idx }, y) end, { a, row })
    assert.equal('index_put', a:index_put({ idx }, row).grad_fn)
  end)

  it('index_put_ accumulate with duplicates and a bool mask', function()
    local a = leaf({ 4, 3 }, 77)
    local v = leaf({ 4, 3 }, 78, -1, 1, true)
    local dup = long{ 1, 3, 1, 1 }
    check('index_put_ accumulate', function(x, y)
      local t = x * 1
      t:index_put_({ dup }, y, true)
      return t * t
    end, { a, v })
    local m = T.tensor{ { true, false, false }, { false, true, true }, { false, false, false }, { true, false, true } }
    local vals = leaf({ 5 }, 79)
    check('index_put_ mask', function(x, y) return x:index_put({ m }, y) end, { a, vals })
    check('t[idx] = v through the Lua syntax', function(x, y)
      local t = x * 1
      t[long{ 0, 2 }] = y:narrow(0, 0, 2)
      return t
    end, { a, v })
  end)
end)

describe('sort and topk gradients', function()
  -- distinct values (no ties), so the permutation is stable under the finite-difference steps
  local a = leaf({ 3, 5 }, 81, -1, 1, true)

  it('sort sends each value back to where it came from', function()
    check('sort', function(x) return (x:sort()) end, { a })
    check('sort dim 0 descending', function(x) return (x:sort(0, true)) end, { a })
    assert.equal('sort', (a:sort()).grad_fn)
    local _, indices = a:sort()
    assert.is_false(indices.requires_grad)
  end)

  it('topk, largest and smallest, sorted or not', function()
    check('topk', function(x) return (x:topk(2)) end, { a })
    check('topk smallest dim 0', function(x) return (x:topk(2, 0, false)) end, { a })
    check('topk unsorted', function(x) return (x:topk(3, -1, true, false)) end, { a })
    local s = T.tensor(1.5, { dtype = 'float64' }):requires_grad_()
    local v = s:topk(1)
    v:backward()
    assert.equal(1, s.grad:item())
  end)
end)

describe('in-place writes and the version counter', function()
  -- y = x * w saves w; writing w in place afterwards must make y's backward fail.
  local function saved_then_written(write)
    local x = leaf({ 3, 4 }, 91)
    local w = T.tensor(S.nest(S.randoms(12, 92), { 3, 4 }), { dtype = 'float64' })
    local y = x * w
    write(w)
    S.assert_error(function() y:sum():backward() end, 'modified by an in-place operation')
  end

  it('reports writes by scatter_, masked_fill_, index_put_ and the random fills at backward', function()
    local idx = long{ { 0, 1, 2, 0 } }
    saved_then_written(function(w) w:scatter_(0, idx, 1) end)
    saved_then_written(function(w) w:scatter_add_(0, idx, T.ones(1, 4, { dtype = 'float64' })) end)
    saved_then_written(function(w) w:masked_fill_(T.tensor{ true, false, false, true }, 0) end)
    saved_then_written(function(w) w:index_put_({ long{ 1 } }, 5) end)
    saved_then_written(function(w) w:index_put_({ long{ 1 } }, 5, true) end)
    saved_then_written(function(w) w:uniform_() end)
    saved_then_written(function(w) w:normal_() end)
    saved_then_written(function(w) w:bernoulli_(0.5) end)
  end)

  it('reports a write to a saved non-leaf that the in-place op recorded', function()
    local x = leaf({ 4 }, 93)
    local h = x * 1
    local y = h * h
    h:masked_fill_(T.tensor{ true, false, false, false }, 0)
    S.assert_error(function() y:sum():backward() end, 'modified by an in-place operation')
    local h2 = x * 1
    local y2 = h2:sort() * h2
    h2:index_put_({ long{ 0 } }, 1)
    S.assert_error(function() y2:sum():backward() end, 'modified by an in-place operation')
  end)

  it('refuses in-place writes to leaves that require grad, and to views of graph tensors', function()
    local w = leaf({ 3, 4 }, 94)
    S.assert_error(function() w:scatter_(0, long{ { 0 } }, 1) end, 'scatter_', 'leaf tensor that requires grad')
    S.assert_error(function() w:masked_fill_(T.tensor{ true, false, false, false }, 0) end, 'masked_fill_', 'leaf')
    S.assert_error(function() w:index_put_({ long{ 0 } }, 1) end, 'index_put_', 'leaf')
    S.assert_error(function() w:uniform_() end, 'uniform_', 'leaf')
    local h = w * 1
    S.assert_error(function() h[0]:masked_fill_(T.tensor{ true, false, false, false }, 0) end, 'view')
    T.no_grad(function() w:masked_fill_(T.tensor{ true, false, false, false }, 0) end)
    assert.equal(0, w[{ 0, 0 }]:item())
  end)

  it('bumps the version without autograd too: a saved index tensor written later is caught', function()
    local a = leaf({ 4 }, 95)
    local idx = long{ 0, 2 }
    local y = a:index_select(0, idx)
    idx:masked_fill_(T.tensor{ true, false }, 1)
    S.assert_error(function() y:sum():backward() end, 'modified by an in-place operation')
  end)
end)
