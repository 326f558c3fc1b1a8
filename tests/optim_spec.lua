-- optim_spec.lua — optimizers against plain-Lua float64 references: AdamW trajectories (float64,
-- float32, float16/bfloat16, strided parameters, the multi-tensor parallel path), SGD with
-- momentum/dampening/nesterov/weight decay, parameter groups, skipped and frozen parameters,
-- state_dict round trips, gradient clipping, the weight-decay and layer-decay group builders
-- (ViT, Swin and PVT names), learning-rate schedules, gradient accumulation, loss scaling
-- (GradScaler), and bad input.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local ffi = require 'ffi'

local optim = T.optim

-- ---- helpers -------------------------------------------------------------------------------------
local function values(t) return S.flatten({ t:totable() }) end

-- A leaf parameter holding `flat` (a list) with `shape`.
local function param(flat, shape, dtype)
  return T.tensor(S.nest(flat, shape or { #flat }), { dtype = dtype or 'float64' }):requires_grad_()
end

local function set_grad(p, flat)
  p.grad = T.tensor(S.nest(flat, p.shape), { dtype = p.dtype })
end

-- A stand-in for an nn module: named_parameters() over a fixed list of {name, tensor}.
local function fake_module(entries)
  return {
    named_parameters = function()
      local i = 0
      return function()
        i = i + 1
        if entries[i] then return entries[i][1], entries[i][2] end
      end
    end,
    parameters = function()
      local out = {}
      for i, e in ipairs(entries) do out[i] = e[2] end
      return out
    end,
  }
end

-- ---- references ----------------------------------------------------------------------------------
-- PyTorch's AdamW on one parameter list, in doubles; grads[t] is the gradient list of step t.
local function adamw_reference(p0, grads, o)
  local p, m, v = {}, {}, {}
  for i, x in ipairs(p0) do p[i], m[i], v[i] = x, 0, 0 end
  local b1, b2 = o.betas[1], o.betas[2]
  for t, g in ipairs(grads) do
    local bc1, bc2 = 1 - b1 ^ t, 1 - b2 ^ t
    for i = 1, #p do
      p[i] = p[i] * (1 - o.lr * o.weight_decay)
      m[i] = b1 * m[i] + (1 - b1) * g[i]
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
      p[i] = p[i] - o.lr / bc1 * m[i] / (math.sqrt(v[i]) / math.sqrt(bc2) + o.eps)
    end
  end
  return p, m, v
end

-- torch.optim.SGD on one parameter list, in doubles.
local function sgd_reference(p0, grads, o)
  local p, buf = {}, nil
  for i, x in ipairs(p0) do p[i] = x end
  for _, g in ipairs(grads) do
    local first = buf == nil
    buf = buf or {}
    for i = 1, #p do
      local d = g[i] + o.weight_decay * p[i]
      if o.momentum ~= 0 then
        buf[i] = first and d or o.momentum * buf[i] + (1 - o.dampening) * d
        d = o.nesterov and d + o.momentum * buf[i] or buf[i]
      end
      p[i] = p[i] - o.lr * d
    end
  end
  return p, buf
end

local function lp_norm(lists, p)
  local acc = 0
  for _, list in ipairs(lists) do
    for _, x in ipairs(list) do
      if p == math.huge then acc = math.max(acc, math.abs(x)) else acc = acc + math.abs(x) ^ p end
    end
  end
  return p == math.huge and acc or acc ^ (1 / p)
end

local ADAMW = { lr = 0.05, betas = { 0.9, 0.999 }, eps = 1e-8, weight_decay = 0.1 }

-- ---- AdamW ---------------------------------------------------------------------------------------
describe('AdamW', function()
  local p0 = S.randoms(6, 11)
  local grads = { S.randoms(6, 12), S.randoms(6, 13), S.randoms(6, 14) }

  local function run(dtype, make)
    local p = make and make(p0) or param(p0, { 2, 3 }, dtype)
    local opt = optim.AdamW({ p }, ADAMW)
    for t = 1, 3 do
      set_grad(p, grads[t])
      opt:step()
    end
    return p, opt
  end

  it('reproduces a hand-computed 3-step trajectory in float64 and float32', function()
    local ref, m, v = adamw_reference(p0, grads, ADAMW)
    local p, opt = run('float64')
    S.assert_close(values(p), ref, 1e-12, 1e-12, 'float64 params')
    local st = opt.state[p]
    assert.equal(3, st.step)
    S.assert_close(values(st.exp_avg), m, 1e-12, 1e-14, 'exp_avg')
    S.assert_close(values(st.exp_avg_sq), v, 1e-12, 1e-14, 'exp_avg_sq')
    local p32, opt32 = run('float32')
    assert.equal('float32', p32.dtype)
    assert.equal('float32', opt32.state[p32].exp_avg.dtype)
    S.assert_close(values(p32), ref, 1e-6, 1e-6, 'float32 params')
  end)

  it('keeps float32 moments and float32 math for float16 and bfloat16 parameters', function()
    local ref = adamw_reference(p0, grads, ADAMW)
    for _, dt in ipairs { 'float16', 'bfloat16' } do
      local p, opt = run(dt)
      assert.equal(dt, p.dtype)
      assert.equal('float32', opt.state[p].exp_avg.dtype)
      assert.equal('float32', opt.state[p].exp_avg_sq.dtype)
      S.assert_close(values(p), ref, dt == 'float16' and 2e-3 or 1.5e-2, 2e-3, dt)
    end
  end)

  it('updates a strided (transposed) parameter in place', function()
    local ref = adamw_reference(p0, grads, ADAMW)
    local base
    local p = run(nil, function(flat)
      -- p is [2,3] with the values of flat, stored transposed
      base = T.tensor(S.nest(flat, { 2, 3 }), { dtype = 'float64' }):t():contiguous()
      return base:t():requires_grad_()
    end)
    assert.is_false(p:is_contiguous())
    S.assert_close(values(p), ref, 1e-12, 1e-12, 'strided param')
    S.assert_close(values(base:t()), ref, 1e-12, 1e-12, 'its storage')
  end)

  it('updates many tensors of one group in one call across the thread pool', function()
    local sizes, ps, refs = { 1, 40000, 3, 17, 30000, 5 }, {}, {}
    local g1 = {}
    for k, n in ipairs(sizes) do
      local init, g = S.randoms(n, 100 + k), S.randoms(n, 200 + k)
      ps[k] = param(init, { n }, 'float32')
      set_grad(ps[k], g)
      g1[k] = g
      refs[k] = adamw_reference(init, { g }, ADAMW)
    end
    local opt = optim.AdamW(ps, ADAMW)
    opt:step()
    for k = 1, #sizes do S.assert_close(values(ps[k]), refs[k], 1e-5, 1e-6, 'tensor ' .. k) end
  end)

  it('applies per-group lr and weight decay, and per-group betas', function()
    local a, b, c = param(p0), param(S.randoms(6, 21)), param(S.randoms(6, 22))
    local oa = { lr = 0.1, betas = ADAMW.betas, eps = 1e-8, weight_decay = 0.5 }
    local ob = { lr = 0.01, betas = ADAMW.betas, eps = 1e-8, weight_decay = 0 }
    local oc = { lr = 0.03, betas = { 0.8, 0.99 }, eps = 1e-6, weight_decay = 0.1 }
    local opt = optim.AdamW({
      { params = { a }, lr = oa.lr, weight_decay = oa.weight_decay, tag = 'first' },
      { params = { b }, lr = ob.lr, weight_decay = 0 },
      { params = { c }, betas = oc.betas, eps = oc.eps, lr = oc.lr },
    }, { weight_decay = 0.1 })
    assert.equal('first', opt.param_groups[1].tag)
    assert.equal(0.1, opt.param_groups[3].weight_decay)
    local ga, gb, gc = {}, {}, {}
    for t = 1, 3 do
      ga[t], gb[t], gc[t] = S.randoms(6, 30 + t), S.randoms(6, 40 + t), S.randoms(6, 50 + t)
      set_grad(a, ga[t]); set_grad(b, gb[t]); set_grad(c, gc[t])
      opt:step()
    end
    S.assert_close(values(a), adamw_reference(p0, ga, oa), 1e-12, 1e-12, 'group a')
    S.assert_close(values(b), adamw_reference(S.randoms(6, 21), gb, ob), 1e-12, 1e-12, 'group b')
    S.assert_close(values(c), adamw_reference(S.randoms(6, 22), gc, oc), 1e-12, 1e-12, 'group c')
  end)

  it('skips parameters without a gradient; their step count starts with their first gradient', function()
    local a, b, none = param(p0), param(S.randoms(6, 61)), param(S.randoms(6, 62))
    local opt = optim.AdamW({ a, b, none }, ADAMW)
    set_grad(a, grads[1])
    opt:step()
    assert.is_nil(opt.state[b])
    set_grad(a, grads[2]); set_grad(b, grads[1])
    opt:step()
    set_grad(a, grads[3]); set_grad(b, grads[2])
    opt:step()
    assert.equal(3, opt.state[a].step)
    assert.equal(2, opt.state[b].step)
    assert.is_nil(opt.state[none])
    S.assert_close(values(a), adamw_reference(p0, grads, ADAMW), 1e-12, 1e-12, 'a')
    S.assert_close(values(b), adamw_reference(S.randoms(6, 61), { grads[1], grads[2] }, ADAMW), 1e-12, 1e-12, 'b')
    S.assert_close(values(none), S.randoms(6, 62), 0, 0, 'untouched')
  end)

  it('takes parameters from an iterator such as model:named_parameters()', function()
    local a, b = param({ 1, 2 }), param({ 3 })
    local model = fake_module({ { 'a', a }, { 'b', b } })
    local opt = optim.AdamW(model:named_parameters(), ADAMW)
    assert.equal(2, #opt.param_groups[1].params)
    assert.equal(b, opt.param_groups[1].params[2])
  end)

  it('leaves frozen parameters alone even when they hold a gradient', function()
    local frozen = T.tensor(S.randoms(4, 71), { dtype = 'float64' })
    local live = param(S.randoms(4, 72))
    local opt = optim.AdamW({ frozen, live }, ADAMW)
    set_grad(frozen, { 1, 1, 1, 1 }); set_grad(live, { 1, 1, 1, 1 })
    opt:step()
    S.assert_close(values(frozen), S.randoms(4, 71), 0, 0, 'frozen')
    assert.is_nil(opt.state[frozen])
    assert.is_not_nil(opt.state[live])
  end)

  it('trains through autograd, bumps versions, and zero_grad drops or zeroes gradients', function()
    local p = param({ 1, 2, 3 })
    local opt = optim.AdamW({ p }, { lr = 0.1, weight_decay = 0 })
    local y = p * p
    y:sum():backward({ retain_graph = true })
    opt:step()
    S.assert_close(values(p), { 0.9, 1.9, 2.9 }, 1e-9, 1e-9)
    -- the graph saved the old p: a backward through it must refuse, not use the new values
    S.assert_error(function() y:sum():backward() end, 'modified by an in-place operation')
    opt:zero_grad(false)
    S.assert_close(values(p.grad), { 0, 0, 0 }, 0, 0)
    opt:zero_grad()
    assert.is_nil(p.grad)
    local calls = 0
    local loss = opt:step(function()
      calls = calls + 1
      local l = (p * p):sum()
      l:backward()
      return l
    end)
    assert.equal(1, calls)
    assert.is_true(T.is_tensor(loss))
  end)
end)

-- ---- SGD -----------------------------------------------------------------------------------------
describe('SGD', function()
  local p0 = S.randoms(5, 81)
  local grads = { S.randoms(5, 82), S.randoms(5, 83), S.randoms(5, 84) }
  local cases = {
    { lr = 0.1, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false },
    { lr = 0.1, momentum = 0.9, dampening = 0, weight_decay = 0.01, nesterov = false },
    { lr = 0.05, momentum = 0.8, dampening = 0.3, weight_decay = 0, nesterov = false },
    { lr = 0.05, momentum = 0.9, dampening = 0, weight_decay = 0.1, nesterov = true },
  }

  for ci, o in ipairs(cases) do
    it(string.format('matches torch.optim.SGD (case %d: momentum %g, dampening %g, nesterov %s)', ci, o.momentum,
      o.dampening, tostring(o.nesterov)), function()
      local ref, buf = sgd_reference(p0, grads, o)
      for _, dt in ipairs { 'float64', 'float32', 'float16' } do
        local p = param(p0, { 5 }, dt)
        local opt = optim.SGD({ p }, o)
        for t = 1, 3 do
          set_grad(p, grads[t])
          opt:step()
        end
        local tol = dt == 'float64' and 1e-12 or dt == 'float32' and 1e-6 or 4e-3
        S.assert_close(values(p), ref, tol, tol, dt)
        if o.momentum ~= 0 then
          S.assert_close(values(opt.state[p].momentum_buffer), buf, tol, tol, dt .. ' buffer')
        else
          assert.is_nil(opt.state[p])
        end
      end
    end)
  end

  it('starts the momentum buffer of a late parameter on its first gradient', function()
    local o = cases[2]
    local a, b = param(p0), param(S.randoms(5, 85))
    local opt = optim.SGD({ a, b }, o)
    set_grad(a, grads[1]); opt:step()
    set_grad(a, grads[2]); set_grad(b, grads[2]); opt:step()
    set_grad(a, grads[3]); set_grad(b, grads[3]); opt:step()
    S.assert_close(values(a), sgd_reference(p0, grads, o), 1e-12, 1e-12, 'a')
    S.assert_close(values(b), sgd_reference(S.randoms(5, 85), { grads[2], grads[3] }, o), 1e-12, 1e-12, 'b')
  end)
end)

-- ---- state_dict -------------------------------------------------------------------------------------
describe('state_dict', function()
  local function train(opt, ps, steps, seed)
    for t = 1, steps do
      for k, p in ipairs(ps) do set_grad(p, S.randoms(p:numel(), seed + 10 * t + k)) end
      opt:step()
    end
  end

  local function clone_params(ps)
    local out = {}
    for k, p in ipairs(ps) do out[k] = p:detach():clone():requires_grad_() end
    return out
  end

  for _, kind in ipairs { 'AdamW', 'SGD' } do
    it(kind .. ': a loaded optimizer continues exactly like the original', function()
      local opts = kind == 'AdamW' and ADAMW or { lr = 0.1, momentum = 0.9, nesterov = true, weight_decay = 1e-3 }
      local ps = { param(S.randoms(6, 91), { 2, 3 }), param(S.randoms(3, 92)) }
      local opt = optim[kind]({ { params = { ps[1] }, lr_scale = 0.5 }, { params = { ps[2] }, lr = 0.02 } }, opts)
      train(opt, ps, 2, 1000)
      local sd = opt:state_dict()
      assert.same({ 0 }, sd.param_groups[1].params)
      assert.same({ 1 }, sd.param_groups[2].params)
      assert.equal(0.5, sd.param_groups[1].lr_scale)
      assert.equal(0.02, sd.param_groups[2].lr)
      assert.is_true(T.is_tensor(kind == 'AdamW' and sd.state[0].exp_avg or sd.state[0].momentum_buffer))

      local ps2 = clone_params(ps)
      local opt2 = optim[kind]({ { params = { ps2[1] } }, { params = { ps2[2] } } }, opts)
      opt2:load_state_dict(sd)
      assert.equal(0.5, opt2.param_groups[1].lr_scale)
      assert.equal(0.02, opt2.param_groups[2].lr)
      train(opt, ps, 2, 2000)
      train(opt2, ps2, 2, 2000)
      for k = 1, 2 do S.assert_close(values(ps2[k]), values(ps[k]), 0, 0, kind .. ' param ' .. k) end
      if kind == 'AdamW' then assert.equal(4, opt2.state[ps2[1]].step) end
    end)
  end

  it('flattens to named tensors and metadata that survive a safetensors file', function()
    local ps = { param(S.randoms(6, 95), { 3, 2 }, 'float32'), param(S.randoms(2, 96), { 2 }, 'float32') }
    local opt = optim.AdamW({ { params = { ps[1] }, lr_scale = 0.25, param_names = { 'w' } }, { params = { ps[2] } } },
      ADAMW)
    train(opt, ps, 2, 3000)
    local tensors, meta = optim.flatten_state_dict(opt:state_dict())
    assert.is_true(T.is_tensor(tensors['state.0.exp_avg']))
    assert.equal(2, tensors['state.1.step']:item())
    local path = os.tmpname()
    T.save(path, tensors, { metadata = meta })
    local loaded, loaded_meta = T.load(path)
    os.remove(path)
    local ps2 = clone_params(ps)
    local opt2 = optim.AdamW({ { params = { ps2[1] } }, { params = { ps2[2] } } }, ADAMW)
    opt2:load_state_dict(optim.unflatten_state_dict(loaded, loaded_meta))
    assert.equal(0.25, opt2.param_groups[1].lr_scale)
    assert.same({ 'w' }, opt2.param_groups[1].param_names)
    train(opt, ps, 1, 4000)
    train(opt2, ps2, 1, 4000)
    for k = 1, 2 do S.assert_close(values(ps2[k]), values(ps[k]), 0, 0, 'param ' .. k) end
    S.assert_error(function() optim.unflatten_state_dict({ weight = T.zeros(1) }, meta) end,
      "'weight' is not an optimizer state tensor")
  end)

  it('refuses state dicts that do not fit', function()
    local p = param(S.randoms(4, 93))
    local opt = optim.AdamW({ p }, ADAMW)
    set_grad(p, { 1, 2, 3, 4 }); opt:step()
    local sd = opt:state_dict()
    local other = optim.AdamW({ param({ 1, 2 }) }, ADAMW)
    S.assert_error(function() other:load_state_dict(sd) end, 'load_state_dict', 'shape [4]', 'shape [2]')
    local two = optim.AdamW({ { params = { param({ 1 }) } }, { params = { param({ 2 }) } } }, ADAMW)
    S.assert_error(function() two:load_state_dict(sd) end, '1 parameter groups, the optimizer 2')
    local sgd = optim.SGD({ param(S.randoms(4, 94)) }, { momentum = 0.9 })
    S.assert_error(function() sgd:load_state_dict(sd) end, 'which SGD does not keep (expected: momentum_buffer)')
    S.assert_error(function() opt:load_state_dict({}) end, 'expected a table with state and param_groups')
  end)
end)

-- ---- clipping ---------------------------------------------------------------------------------------
describe('clip_grad_norm_', function()
  local function setup(dtype)
    local a, b = param(S.randoms(7, 101), { 7 }, dtype), param(S.randoms(40000, 102), { 200, 200 }, dtype)
    local ga, gb = S.randoms(7, 103, -3, 3), S.randoms(40000, 104)
    set_grad(a, ga); set_grad(b, gb)
    local none = param({ 1, 2 }, { 2 }, dtype) -- no gradient: ignored
    return { a, none, b }, { ga, gb }
  end

  for _, norm_type in ipairs { 2, math.huge, 1, 3 } do
    it('clips by the total ' .. tostring(norm_type) .. '-norm and returns it', function()
      local ps, gs = setup('float64')
      local ref = lp_norm(gs, norm_type)
      local max_norm = ref / 4
      local total = optim.clip_grad_norm_(ps, max_norm, norm_type == math.huge and 'inf' or norm_type)
      S.assert_close(total, ref, 1e-12, 0, 'total norm')
      local coef = max_norm / (ref + 1e-6)
      local expect_a, expect_b = {}, {}
      for i, x in ipairs(gs[1]) do expect_a[i] = x * coef end
      for i, x in ipairs(gs[2]) do expect_b[i] = x * coef end
      S.assert_close(values(ps[1].grad), expect_a, 1e-12, 1e-15, 'a.grad')
      S.assert_close(values(ps[3].grad), expect_b, 1e-12, 1e-15, 'b.grad')
      S.assert_close(optim.grad_norm(ps, norm_type), max_norm, 1e-6, 0, 'norm after clipping')
    end)
  end

  it('leaves gradients under max_norm unchanged; works on float32 and float16', function()
    for _, dt in ipairs { 'float32', 'float16' } do
      local ps, gs = setup(dt)
      local before = values(ps[1].grad)
      local total = optim.clip_grad_norm_(ps, 1e9)
      S.assert_close(total, lp_norm({ before, values(ps[3].grad) }, 2), 1e-6, 0, dt)
      S.assert_close(values(ps[1].grad), before, 0, 0, dt .. ' unchanged')
      optim.clip_grad_norm_(ps, 1.0)
      S.assert_close(optim.grad_norm(ps), 1.0, dt == 'float16' and 2e-3 or 1e-5, 0, dt .. ' clipped')
      assert.equal(dt, ps[1].grad.dtype)
      assert.is_not_nil(gs)
    end
  end)

  it('reports non-finite norms when asked, and returns 0 without gradients', function()
    local p = param({ 1, 2 })
    assert.equal(0, optim.clip_grad_norm_({ p }, 1))
    set_grad(p, { 0 / 0, 1 })
    assert.is_true(optim.clip_grad_norm_({ p }, 1) ~= optim.clip_grad_norm_({ p }, 1))
    S.assert_error(function() optim.clip_grad_norm_({ p }, 1, 2, true) end, 'non-finite')
    S.assert_error(function() optim.clip_grad_norm_({ p }, 1, 0) end, 'norm_type must be a number > 0')
    S.assert_error(function() optim.clip_grad_norm_({ p }, -1) end, 'max_norm must be a finite number >= 0')
  end)
end)

-- ---- parameter groups -------------------------------------------------------------------------------
local function fake_vit(depth)
  local D = 4
  local entries = {
    { 'cls_token', param(S.randoms(D, 1), { 1, 1, D }) },
    { 'pos_embed', param(S.randoms(3 * D, 2), { 1, 3, D }) },
    { 'patch_embed.proj.weight', param(S.randoms(D * 12, 3), { D, 3, 2, 2 }) },
    { 'patch_embed.proj.bias', param(S.randoms(D, 4)) },
  }
  for i = 0, depth - 1 do
    local pre = 'blocks.' .. i .. '.'
    entries[#entries + 1] = { pre .. 'norm1.weight', param(S.randoms(D, 5)) }
    entries[#entries + 1] = { pre .. 'attn.qkv.weight', param(S.randoms(3 * D * D, 6), { 3 * D, D }) }
    entries[#entries + 1] = { pre .. 'attn.qkv.bias', param(S.randoms(3 * D, 7)) }
    entries[#entries + 1] = { pre .. 'mlp.fc1.weight', param(S.randoms(D * D, 8), { D, D }) }
  end
  entries[#entries + 1] = { 'fc_norm.weight', param(S.randoms(D, 9)) }
  entries[#entries + 1] = { 'head.weight', param(S.randoms(2 * D, 10), { 2, D }) }
  entries[#entries + 1] = { 'head.bias', param(S.randoms(2, 11)) }
  local frozen = T.tensor(S.randoms(D * D, 12), { dtype = 'float64' }):view(D, D)
  entries[#entries + 1] = { 'frozen.weight', frozen }
  return fake_module(entries), entries
end

-- name → the group holding it
local function group_of(groups)
  local where = {}
  for _, g in ipairs(groups) do
    assert.equal(#g.param_names, #g.params)
    for _, name in ipairs(g.param_names) do where[name] = g end
  end
  return where
end

describe('param_groups_weight_decay', function()
  it("follows timm's rule: no decay for 1-D params, biases and the skip list; frozen left out", function()
    local model = fake_vit(1)
    local groups = optim.param_groups_weight_decay(model, 0.05, { 'pos_embed' })
    assert.equal(2, #groups)
    assert.equal(0, groups[1].weight_decay)
    assert.equal(0.05, groups[2].weight_decay)
    assert.same({ 'pos_embed', 'patch_embed.proj.bias', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias',
      'fc_norm.weight', 'head.bias' }, groups[1].param_names)
    assert.same({ 'cls_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc1.weight',
      'head.weight' }, groups[2].param_names)
    -- a set works as a skip list too, and the groups feed an optimizer directly
    local g2 = optim.param_groups_weight_decay(model, 0.05, { cls_token = true, pos_embed = true })
    assert.equal('cls_token', g2[1].param_names[1])
    local opt = optim.AdamW(g2, { lr = 1e-3 })
    assert.equal(0.05, opt.param_groups[2].weight_decay)
    assert.equal(0, opt.param_groups[1].weight_decay)
  end)
end)

describe('param_groups_lrd', function()
  it("gives MAE/BEiT's layer scales and groups for a ViT", function()
    local model = fake_vit(2) -- num_layers = 3
    local d = 0.75
    local groups = optim.param_groups_lrd(model, { weight_decay = 0.05, no_weight_decay_list = { 'cls_token', 'pos_embed' },
      layer_decay = d })
    local where = group_of(groups)
    local expect = {
      cls_token = { 0, 0 }, pos_embed = { 0, 0 }, ['patch_embed.proj.weight'] = { 0, 0.05 },
      ['patch_embed.proj.bias'] = { 0, 0 }, ['blocks.0.norm1.weight'] = { 1, 0 },
      ['blocks.0.attn.qkv.weight'] = { 1, 0.05 }, ['blocks.1.attn.qkv.bias'] = { 2, 0 },
      ['blocks.1.mlp.fc1.weight'] = { 2, 0.05 }, ['fc_norm.weight'] = { 3, 0 }, ['head.weight'] = { 3, 0.05 },
      ['head.bias'] = { 3, 0 },
    }
    for name, e in each(expect) do
      local g = where[name]
      assert.is_not_nil(g, name)
      S.assert_close(g.lr_scale, d ^ (3 - e[1]), 1e-15, 0, name .. ' lr_scale')
      assert.equal(e[2], g.weight_decay, name .. ' weight_decay')
    end
    assert.is_nil(where['frozen.weight'])
    -- groups in first-seen order: layer_0_no_decay (cls_token) first, then layer_0_decay
    assert.equal('cls_token', groups[1].param_names[1])
    assert.equal('patch_embed.proj.weight', groups[2].param_names[1])
    assert.equal(8, #groups)
    -- adjust_learning_rate scales every group's lr by its lr_scale
    local opt = optim.AdamW(groups, { lr = 1 })
    local sched = optim.lr_schedule.constant { base_lr = 2e-3 }
    assert.equal(2e-3, optim.adjust_learning_rate(opt, 3.5, sched))
    for _, g in ipairs(opt.param_groups) do S.assert_close(g.lr, 2e-3 * g.lr_scale, 1e-15, 0) end
  end)

  it('maps flat UM-MAE Swin/PVT blocks, stage-named Swin/timm and PVT names to global block ids', function()
    local depths = { 2, 3 }
    local id, n = optim.layer_id_for_stages(depths)
    assert.equal(6, n)
    local cases = {
      { 'patch_embed.proj.weight', 0 }, { 'absolute_pos_embed', 0 }, { 'mask_token', 0 },
      { 'blocks.3.downsample.proj.weight', 4 },              -- UM-MAE: flat list, merging inside block 3
      { 'layers.0.blocks.1.attn.qkv.weight', 2 }, { 'layers.1.blocks.0.mlp.fc1.weight', 3 },
      { 'layers.0.downsample.reduction.weight', 2 },         -- Swin: after stage 0's last block
      { 'stages.1.downsample.reduction.weight', 3 },         -- timm: before stage 1's first block
      { 'stages.1.blocks.2.norm1.weight', 5 },
      { 'block1.1.attn.q.weight', 2 }, { 'block2.0.attn.q.weight', 3 },   -- PVT, stages from 1
      { 'patch_embed1.proj.weight', 0 }, { 'patch_embed2.proj.weight', 3 }, { 'pos_embed2', 3 },
      { 'norm1.weight', 2 }, { 'norm2.weight', 6 }, { 'norm.weight', 6 }, { 'head.weight', 6 },
    }
    for _, c in ipairs(cases) do assert.equal(c[2], id(c[1], n), c[1]) end
    S.assert_error(function() id('layers.2.blocks.0.x', n) end, 'names stage 2', 'lists 2 stages')

    local model = fake_module({
      { 'patch_embed.proj.weight', param({ 1, 2, 3, 4 }, { 2, 2 }) },
      { 'layers.0.blocks.0.attn.qkv.weight', param({ 1, 2, 3, 4 }, { 2, 2 }) },
      { 'layers.1.blocks.2.attn.qkv.weight', param({ 1, 2, 3, 4 }, { 2, 2 }) },
      { 'head.weight', param({ 1, 2, 3, 4 }, { 2, 2 }) },
    })
    local groups = optim.param_groups_lrd(model, { depths = depths, layer_decay = 0.5 })
    local where = group_of(groups)
    assert.equal(0.5 ^ 6, where['patch_embed.proj.weight'].lr_scale)
    assert.equal(0.5 ^ 5, where['layers.0.blocks.0.attn.qkv.weight'].lr_scale)
    assert.equal(0.5 ^ 1, where['layers.1.blocks.2.attn.qkv.weight'].lr_scale)
    assert.equal(1, where['head.weight'].lr_scale)
  end)

  it('accepts a custom layer_id and refuses ids out of range', function()
    local model = fake_vit(1)
    local groups = optim.param_groups_lrd(model, { layer_id = function() return 1 end, num_layers = 4, layer_decay = 0.5 })
    for _, g in ipairs(groups) do assert.equal(0.5 ^ 3, g.lr_scale) end
    S.assert_error(function() optim.param_groups_lrd(model, { layer_id = function() return 9 end }) end,
      'layer_id gave 9', 'cls_token', '[0, 2]')
    S.assert_error(function() optim.param_groups_lrd(model, { decay = 0.5 }) end, "unknown option 'decay'", 'layer_decay')
  end)
end)

-- ---- schedules --------------------------------------------------------------------------------------
describe('lr_schedule', function()
  it("cosine_warmup matches MAE's adjust_learning_rate", function()
    local base, min_lr, warm, epochs = 1e-3, 1e-6, 5, 50
    local f = optim.lr_schedule.cosine_warmup { base_lr = base, min_lr = min_lr, warmup_epochs = warm, epochs = epochs }
    local function formula(e)
      if e < warm then return base * e / warm end
      return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warm) / (epochs - warm)))
    end
    for _, e in ipairs { 0, 0.5, 2.25, 4.999, 5, 10.3, 27.5, 49.99 } do
      S.assert_close(f(e), formula(e), 1e-15, 0, 'epoch ' .. e)
    end
    assert.equal(0, f(0))
    assert.equal(base, f(5))
    S.assert_close(f(27.5), min_lr + (base - min_lr) * 0.5, 1e-12, 0, 'mid')
    assert.equal(min_lr, f(50))
    assert.equal(min_lr, f(80))
  end)

  it('step and constant schedules', function()
    local s = optim.lr_schedule.step { base_lr = 0.1, step_size = 10, gamma = 0.5 }
    assert.equal(0.1, s(9.9))
    assert.equal(0.05, s(10))
    assert.equal(0.025, s(25))
    local m = optim.lr_schedule.step { base_lr = 1, milestones = { 3, 7 }, gamma = 0.1, warmup_epochs = 1 }
    assert.equal(0.5, m(0.5))
    assert.equal(1, m(2))
    S.assert_close(m(3), 0.1, 1e-15, 0)
    S.assert_close(m(7), 0.01, 1e-15, 0)
    local c = optim.lr_schedule.constant { base_lr = 0.3, warmup_epochs = 2 }
    S.assert_close(c(1), 0.15, 1e-15, 0)
    assert.equal(0.3, c(100))
  end)

  it('refuses bad schedule options', function()
    S.assert_error(function() optim.lr_schedule.cosine_warmup { base_lr = 1, warmup_epochs = 5, epochs = 5 } end,
      'epochs (5) must be greater than warmup_epochs (5)')
    S.assert_error(function() optim.lr_schedule.cosine_warmup { base_lr = 1, epochs = 5, lr = 1 } end,
      "unknown option 'lr'", 'base_lr, epochs, min_lr, warmup_epochs')
    S.assert_error(function() optim.lr_schedule.step { base_lr = 1 } end, 'exactly one of step_size and milestones')
    S.assert_error(function() optim.lr_schedule.constant { base_lr = -1 } end, 'base_lr must be a finite number >= 0')
  end)
end)

-- ---- gradient accumulation --------------------------------------------------------------------------
describe('Accumulator', function()
  -- y = sum(x * w, 1): a linear model; loss = mean((y - t)^2)
  local X = S.randoms(4 * 3, 121)
  local Y = S.randoms(4, 122)
  local function loss_of(w, rows)
    local xs, ts = {}, {}
    for _, r in ipairs(rows) do
      xs[#xs + 1] = { X[3 * r - 2], X[3 * r - 1], X[3 * r] }
      ts[#ts + 1] = Y[r]
    end
    local x, t = T.tensor(xs, { dtype = 'float64' }), T.tensor(ts, { dtype = 'float64' })
    local d = (x * w):sum(1) - t
    return (d * d):mean()
  end

  it('two half-batches with accum_iter 2 equal one full-batch step', function()
    local w1, w2 = param({ 0.1, -0.2, 0.3 }, { 1, 3 }), param({ 0.1, -0.2, 0.3 }, { 1, 3 })
    local full = optim.SGD({ w1 }, { lr = 0.1, momentum = 0.9 })
    local halves = optim.SGD({ w2 }, { lr = 0.1, momentum = 0.9 })
    local acc = optim.Accumulator(halves, 2)
    for _ = 1, 2 do
      loss_of(w1, { 1, 2, 3, 4 }):backward()
      full:step()
      full:zero_grad()
      assert.is_true(acc:at_window_start())
      assert.is_false(acc:backward(loss_of(w2, { 1, 2 })))
      assert.is_false(acc:at_window_start())
      assert.is_true(acc:backward(loss_of(w2, { 3, 4 })))
      assert.is_nil(w2.grad)
    end
    S.assert_close(values(w2), values(w1), 1e-12, 1e-14, 'weights')
  end)

  it('clips before stepping when max_norm is set, and reset drops a partial window', function()
    local w = param({ 0.1, -0.2, 0.3 }, { 1, 3 })
    local opt = optim.SGD({ w }, { lr = 0 })
    local acc = optim.Accumulator(opt, 1, { max_norm = 1e-3 })
    local stepped, norm = acc:backward(loss_of(w, { 1, 2 }))
    assert.is_true(stepped)
    assert.is_true(norm > 1e-3)
    local acc2 = optim.Accumulator(opt, 3)
    acc2:backward(loss_of(w, { 1 }))
    acc2:reset()
    assert.is_nil(w.grad)
    assert.is_true(acc2:at_window_start())
    S.assert_error(function() optim.Accumulator(opt, 0) end, 'accum_iter must be an integer >= 1')
  end)
end)

-- ---- loss scaling ---------------------------------------------------------------------------------
describe('GradScaler', function()
  local function quadratic(w, c) return (w * w * T.tensor(c, { dtype = w.dtype })):sum() end

  it('scales the loss, unscales the gradients exactly and steps as an unscaled run', function()
    local plain, scaled = param({ 0.5, -1.25, 2 }, nil, 'float32'), param({ 0.5, -1.25, 2 }, nil, 'float32')
    local o1, o2 = optim.AdamW({ plain }, { lr = 0.1 }), optim.AdamW({ scaled }, { lr = 0.1 })
    local scaler = optim.GradScaler()
    assert.equals(65536, scaler:get_scale())
    for _ = 1, 3 do
      quadratic(plain, { 1, 2, 3 }):backward()
      local want = values(plain.grad)
      o1:step()
      o1:zero_grad()
      local loss = quadratic(scaled, { 1, 2, 3 })
      assert.equals(loss:item() * 65536, scaler:scale(loss):item())
      scaler:scale(loss):backward()
      assert.is_false(scaler:unscale_(o2))
      assert.same(want, values(scaled.grad))
      assert.is_true(scaler:step(o2))
      scaler:update()
      o2:zero_grad()
      assert.same(values(plain), values(scaled))
    end
  end)

  it('skips a step with Inf/NaN gradients and backs off, grows after growth_interval clean steps', function()
    local w = param({ 1, 2 }, nil, 'float32')
    local opt = optim.AdamW({ w }, { lr = 0.1 })
    local scaler = optim.GradScaler { init_scale = 8, growth_interval = 2 }
    local function step(c)
      scaler:scale(quadratic(w, c)):backward()
      local stepped = scaler:step(opt)
      scaler:update()
      opt:zero_grad()
      return stepped
    end
    assert.is_false(step({ math.huge, 1 }))
    assert.same({ 1, 2 }, values(w))
    assert.is_nil(opt.state[w]) -- the skipped step left AdamW without state
    assert.equals(4, scaler:get_scale())
    assert.is_false(step({ 0 / 0, 1 }))
    assert.equals(2, scaler:get_scale())
    assert.is_true(step({ 1, 1 }))
    assert.is_not_nil(opt.state[w])
    assert.equals(2, scaler:get_scale())
    assert.is_true(step({ 1, 1 }))
    assert.equals(4, scaler:get_scale()) -- two clean steps
    assert.same({ scale = 4, growth_factor = 2, backoff_factor = 0.5, growth_interval = 2, _growth_tracker = 0 },
      scaler:state_dict())
    assert.is_true(step({ 1, 1 }))
    local copy = optim.GradScaler()
    copy:load_state_dict(scaler:state_dict())
    assert.same(scaler:state_dict(), copy:state_dict())
  end)

  it('widens a 16-bit loss to float32 before scaling, and tells huge finite gradients from Inf', function()
    local scaler = optim.GradScaler()
    local scaled = scaler:scale(T.tensor(3, { dtype = 'float16' }))
    assert.equals('float32', scaled.dtype)
    assert.equals(3 * 65536, scaled:item())
    local w = param({ 1, 2 }) -- float64: the squares of its gradients would overflow
    w.grad = T.tensor({ 1e300 * 65536, -1e300 * 65536 }, { dtype = 'float64' })
    assert.is_false(scaler:unscale_(optim.SGD({ w }, { lr = 0 })))
    assert.same({ 1e300, -1e300 }, values(w.grad))
  end)

  it('passes everything through when disabled', function()
    local w = param({ 1, 2 }, nil, 'float32')
    local opt = optim.SGD({ w }, { lr = 0.5 })
    local scaler = optim.GradScaler { enabled = false }
    local loss = quadratic(w, { 1, 1 })
    assert.equals(loss, scaler:scale(loss))
    loss:backward()
    assert.is_true(scaler:step(opt))
    scaler:update()
    assert.same({ 0, 0 }, values(w))
    assert.same({}, scaler:state_dict())
    assert.equals(1, scaler:get_scale())
  end)

  it('in an Accumulator: scaled, unscaled before clipping, the same weights as without it', function()
    local a, b = param({ 0.5, -1.25, 2 }, nil, 'float32'), param({ 0.5, -1.25, 2 }, nil, 'float32')
    local acc_a = optim.Accumulator(optim.AdamW({ a }, { lr = 0.1 }), 2, { max_norm = 0.5 })
    local acc_b = optim.Accumulator(optim.AdamW({ b }, { lr = 0.1 }), 2, { max_norm = 0.5, scaler = optim.GradScaler() })
    for i = 1, 4 do
      local sa, na = acc_a:backward(quadratic(a, { i, 1, 2 }))
      local sb, nb = acc_b:backward(quadratic(b, { i, 1, 2 }))
      assert.equals(sa, sb)
      assert.equals(na, nb)
    end
    assert.same(values(a), values(b))
    local skip = optim.Accumulator(optim.SGD({ b }, { lr = 0.1 }), 1, { scaler = optim.GradScaler() })
    assert.is_false(skip:backward(quadratic(b, { math.huge, 1, 1 })))
    assert.same(values(a), values(b))
    assert.is_nil(b.grad)
  end)

  it('refuses bad options and calls out of order', function()
    local w = param({ 1 }, nil, 'float32')
    local opt = optim.SGD({ w }, { lr = 0.1 })
    S.assert_error(function() optim.GradScaler { init_scale = 0 } end, 'GradScaler: init_scale must be a finite number > 0')
    S.assert_error(function() optim.GradScaler { growth_factor = 1 } end, 'GradScaler: growth_factor must be > 1')
    S.assert_error(function() optim.GradScaler { backoff_factor = 1 } end, 'GradScaler: backoff_factor must be < 1')
    S.assert_error(function() optim.GradScaler { growth_interval = 0 } end, 'growth_interval must be an integer >= 1')
    S.assert_error(function() optim.GradScaler { enable = true } end, "GradScaler: unknown option 'enable'")
    local scaler = optim.GradScaler()
    S.assert_error(function() scaler:scale(2) end, 'GradScaler:scale: expected a tensor')
    S.assert_error(function() scaler:step({}) end, 'GradScaler:step: expected an optimizer')
    S.assert_error(function() scaler:update() end, 'no optimizer was unscaled or stepped')
    scaler:scale(quadratic(w, { 1 })):backward()
    scaler:unscale_(opt)
    S.assert_error(function() scaler:unscale_(opt) end, 'already called on this optimizer since the last update()')
    scaler:step(opt)
    S.assert_error(function() scaler:step(opt) end, 'GradScaler:step: already called on this optimizer')
    scaler:update()
    local half = param({ 1 }, nil, 'float16')
    half.grad = T.ones(1, { dtype = 'float16' })
    S.assert_error(function() scaler:unscale_(optim.SGD({ half }, { lr = 0.1 })) end,
      'GradScaler:unscale_: attempting to unscale float16 gradients')
    S.assert_error(function() scaler:load_state_dict({}) end, 'the state is empty')
    S.assert_error(function() scaler:load_state_dict({ scale = -1 }) end, 'scale must be a finite number > 0')
    S.assert_error(function()
      scaler:load_state_dict({ scale = 4, growth_factor = 0.5, backoff_factor = 0.5, growth_interval = 2, _growth_tracker = 0 })
    end, 'GradScaler:load_state_dict: growth_factor must be > 1')
    S.assert_error(function() optim.Accumulator(opt, 1, { scaler = {} }) end, 'scaler must be a T.optim.GradScaler')
  end)
end)

-- ---- bad input --------------------------------------------------------------------------------------
describe('bad input', function()
  it('refuses unknown options and bad hyper-parameters', function()
    local p = param({ 1, 2 })
    S.assert_error(function() optim.AdamW({ p }, { learning_rate = 1 }) end, "AdamW: unknown option 'learning_rate'",
      'betas, eps, lr, weight_decay')
    S.assert_error(function() optim.AdamW({ p }, { lr = -1 }) end, 'lr must be a finite number >= 0, got -1')
    S.assert_error(function() optim.AdamW({ p }, { betas = { 0.9, 1 } }) end, 'betas[2] must be in [0, 1)')
    S.assert_error(function() optim.AdamW({ p }, { eps = 0 / 0 }) end, 'eps must be a finite number >= 0')
    S.assert_error(function() optim.SGD({ p }, { momentum = -0.1 }) end, 'momentum must be a finite number >= 0')
    S.assert_error(function() optim.SGD({ p }, { nesterov = true }) end, 'Nesterov momentum requires a momentum > 0')
    S.assert_error(function() optim.SGD({ p }, { nesterov = 1, momentum = 0.9 }) end, 'nesterov must be a boolean')
    local opt = optim.AdamW({ p })
    opt.param_groups[1].lr = -3 -- a bad value set later is caught at step time
    set_grad(p, { 1, 1 })
    S.assert_error(function() opt:step() end, 'lr must be a finite number >= 0, got -3')
  end)

  it('refuses bad parameter lists', function()
    local p = param({ 1, 2 })
    S.assert_error(function() optim.AdamW({}) end, 'empty parameter list')
    S.assert_error(function() optim.AdamW({ p, p }) end, 'more than one parameter group')
    S.assert_error(function() optim.AdamW({ { params = { p } }, { params = { p } } }) end, 'more than one parameter group')
    S.assert_error(function() optim.AdamW({ p * 2 }) end, 'not a leaf tensor', 'mul')
    S.assert_error(function() optim.SGD({ T.tensor({ 1, 2 }, { dtype = 'int64' }) }) end, 'int64', 'floating point')
    S.assert_error(function() optim.AdamW({ 3 }) end, 'params[1] is a number, expected a tensor')
    S.assert_error(function() optim.AdamW({ { lr = 1 } }) end, 'params')
  end)

  it('the C steps refuse mismatched shapes, dtypes and bad scalars with clear messages', function()
    local C = require('tessera.core').C
    local function arr(...)
      local list = { ... }
      local a = ffi.new('ts_tensor*[?]', #list)
      for i, t in ipairs(list) do a[i - 1] = t.h end
      return a
    end
    local p = param({ 1, 2, 3 }, { 3 }, 'float32')
    local g = T.zeros(3)
    local m, v = T.zeros(3), T.zeros(3)
    local lr, wd = ffi.new('double[1]', 0.1), ffi.new('double[1]', 0)
    local step = ffi.new('int64_t[1]', 1)
    local function adamw(pp, gg, mm, vv, b1)
      local st = C.ts_adamw_step(1, arr(pp), arr(gg), arr(mm), arr(vv), lr, wd, b1 or 0.9, 0.999, 1e-8, step)
      if st ~= 0 then error(ffi.string(C.ts_last_error()), 0) end
    end
    S.assert_error(function() adamw(p, T.zeros(4), m, v) end, 'adamw_step: grad 0 has shape [4] but param 0 has shape [3]')
    S.assert_error(function() adamw(p, T.zeros(3, { dtype = 'float64' }), m, v) end,
      'grad 0 is float64, expected float32')
    S.assert_error(function() adamw(p, g, T.zeros(3, { dtype = 'float64' }), v) end,
      'exp_avg 0 is float64, expected float32 for a float32 param')
    S.assert_error(function() adamw(p, g, m, T.zeros(1):expand(3)) end, 'exp_avg_sq 0 [3] is a broadcast')
    S.assert_error(function() adamw(p, g, m, v, 1.0) end, 'beta1 must be in [0, 1), got 1')
    S.assert_error(function() adamw(p * 2, g, m, v) end, 'param 0 [3] is not a leaf')
    step[0] = 0
    S.assert_error(function() adamw(p, g, m, v) end, 'step[0] must be >= 1')
    -- a NULL grad skips its parameter (whose state may be NULL as well)
    step[0] = 1
    local q = param({ 5, 6, 7 }, { 3 }, 'float32')
    local ps, gs = arr(p, q), arr(p, g)
    local ms, vs = arr(m, m), arr(v, v)
    gs[0], ms[0], vs[0] = nil, nil, nil
    local lr2, wd2, step2 = ffi.new('double[2]', 0.1, 0.1), ffi.new('double[2]', 0, 0), ffi.new('int64_t[2]', 0, 1)
    assert.equal(0, C.ts_adamw_step(2, ps, gs, ms, vs, lr2, wd2, 0.9, 0.999, 1e-8, step2))
    S.assert_close(values(p), { 1, 2, 3 }, 0, 0, 'skipped')
    S.assert_close(values(q), { 5, 6, 7 }, 0, 0, 'zero gradient: no move')
    local out = ffi.new('double[1]')
    assert.equal(0, C.ts_grad_norm(1, arr(g), 2, out))
    assert.is_true(C.ts_grad_norm(1, arr(T.zeros(2, { dtype = 'int64' })), 2, out) ~= 0)
    assert.truthy(ffi.string(C.ts_last_error()):find('grad_norm: tensor 0 must be floating point', 1, true))
    assert.is_true(C.ts_scale_(1, arr(T.zeros(1):expand(3)), 2) ~= 0)
    assert.truthy(ffi.string(C.ts_last_error()):find('broadcast', 1, true))
    assert.is_true(C.ts_sgd_step(1, arr(p), arr(g), nil, lr, wd, 0.9, 0, 0, nil) ~= 0)
    assert.truthy(ffi.string(C.ts_last_error()):find('momentum_buffers', 1, true))
    C.ts_clear_error()
  end)
end)
